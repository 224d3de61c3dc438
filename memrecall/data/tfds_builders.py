"""TFDS builders for the synthetic tasks and RULER-HQA, built and read without TensorFlow.

They write array_record files and are read through `as_data_source()` (random
access); `as_dataset()` / `tfds.load()` and the tfrecord format would need
TensorFlow (docs/architecture.md#data-without-tensorflow).  Every record is
`{"id", "example_json"}`, the whole `Example` as JSON, so a stored dataset
decodes to exactly what the Python generators return and the Example format
stays the one mechanism.

Records are written unshuffled with integer keys 0..n-1 (`disable_shuffling`),
so index i of a data source is generation index i: example i of
`sources.synthetic_splits(...)[split]`, or the i-th chosen RULER-HQA question.
A change to the generators (synthetic.py, ruler_hqa.py) changes the data: bump
the builder's VERSION with it.

Usage:
  builder = SyntheticTasks(config=synthetic_config(TaskConfig(...)), data_dir=...)
  builder.download_and_prepare()
  train = tfds_source(builder, "train")   # an ExampleSource
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

from memrecall.data import ruler_hqa, sources
from memrecall.data.example import Example
from memrecall.data.synthetic import TaskConfig
from memrecall.runtime import fingerprint

FILE_FORMAT = "array_record"

# --- the record format ------------------------------------------------------


class _ExampleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """array_record by default; one `{"id", "example_json"}` record per Example, unshuffled."""

  DESCRIPTION = ""

  def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs would look for README/CITATIONS files
    # beside this module.
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                             "example_json": tfds.features.Text()}),
        disable_shuffling=True)

  def download_and_prepare(self, *args, **kwargs):
    # tensorflow-datasets 4.9.10 needs importlib_resources to build a dataset defined in a
    # package, but declares it only for Python < 3.9 (tensorflow/datasets#11212).
    try:
      import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("building TFDS datasets needs the importlib_resources package, which "
                        "tensorflow-datasets fails to declare: pip install importlib_resources"
                        ) from None
    return super().download_and_prepare(*args, **kwargs)


def _record(example: Example) -> dict[str, str]:
  return {"id": example.id, "example_json": example.to_json()}


# --- synthetic tasks ----------------------------------------------------------

SHORT_SPLIT_SIZES = {"train": 4096, "validation": 256, "test": 256}
LONG_SPLIT_SIZES = {"validation": 256, "test": 256}  # long contexts are for evaluation
LONG_FROM = 4096  # contexts of at least this many tokens get LONG_SPLIT_SIZES by default
DEFAULT_HOPS = {"multihop": 2, "vartrack": 4, "hotpot": 2}
PREDEFINED_LENGTHS = (256, 2048, 16384)
_DEFAULT_ENTITIES = TaskConfig().num_entities


def default_split_sizes(task: TaskConfig) -> dict[str, int]:
  return dict(LONG_SPLIT_SIZES if task.length >= LONG_FROM else SHORT_SPLIT_SIZES)


def _percent(density: float) -> str:
  return f"{density * 100:g}"


def synthetic_config_name(task: TaskConfig, base_seed: int = 0,
                          split_sizes: Mapping[str, int] | None = None) -> str:
  """`multihop-ids-L256-h2-d100`, plus `-e{entities}`, `-g{min_fact_gap}`, `-c` (chain
  distractors), `-s{seed}` and `-{split}{size}...` when they differ from the defaults: one
  name per distinct dataset, so a data_dir never holds a stale build under a reused name."""
  name = (f"{task.task}-{task.form}-L{task.length}-h{task.hops}"
          f"-d{_percent(task.distractor_density)}")
  if task.num_entities != _DEFAULT_ENTITIES:
    name += f"-e{task.num_entities}"
  if task.min_fact_gap:
    name += f"-g{task.min_fact_gap}"
  if task.chain_distractors:
    name += "-c"
  if base_seed:
    name += f"-s{base_seed}"
  if split_sizes is not None and dict(split_sizes) != default_split_sizes(task):
    name += "".join(f"-{split}{size}" for split, size in _ordered(split_sizes).items())
  return name


def _ordered(split_sizes: Mapping[str, int]) -> dict[str, int]:
  """Split sizes checked and in SPLITS order."""
  unknown = set(split_sizes) - set(sources.SPLITS)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; choose from {tuple(sources.SPLITS)}")
  if any(size < 0 for size in split_sizes.values()) or not any(split_sizes.values()):
    raise ValueError("split sizes must be >= 0 with at least one positive, got "
                     f"{dict(split_sizes)}")
  return {split: split_sizes[split] for split in sources.SPLITS if split in split_sizes}


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticTasksConfig(tfds.core.BuilderConfig):
  """One synthetic task; splits are `sources.synthetic_splits(task, split_sizes, base_seed)`
  (a split of size 0 is left out)."""
  task: TaskConfig = TaskConfig()
  base_seed: int = 0
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)


def _new_synthetic_config(task: TaskConfig, base_seed: int,
                          split_sizes: Mapping[str, int] | None) -> SyntheticTasksConfig:
  sizes = _ordered(default_split_sizes(task) if split_sizes is None else split_sizes)
  sources.split_seed(base_seed, "train")  # validates the seed
  return SyntheticTasksConfig(
      name=synthetic_config_name(task, base_seed, sizes), task=task, base_seed=base_seed,
      split_sizes=sizes,
      description=f"{task}, base seed {base_seed}, split sizes {sizes}")


def synthetic_config(task: TaskConfig, base_seed: int = 0,
                     split_sizes: Mapping[str, int] | None = None) -> SyntheticTasksConfig:
  """The builder config for any TaskConfig (the predefined object when one matches:
  TFDS refuses a custom config named like a predefined one)."""
  config = _new_synthetic_config(task, base_seed, split_sizes)
  predefined = SyntheticTasks.builder_configs.get(config.name)
  return config if predefined is None else predefined


class SyntheticTasks(_ExampleBuilder):
  """memrecall's synthetic long-context tasks (multihop, vartrack, hotpot; ids and text).

  The text form's length is measured with the byte-level tokenizer, as `make_example`'s
  default; other tokenizers go through `sources.SyntheticSource` directly.
  """

  DESCRIPTION = "memrecall's synthetic tasks: one Example (as JSON) per record."
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release: synthetic.py as of the Example format.",
                   "1.1.0": "The text form's names the same in every Python process (they "
                             "followed its string hashing).",
                   "1.2.0": "The text form's segments lead with their space (' A leads to B.'), "
                             "as a whole-text tokenizer would join it; the ids form unchanged."}
  BUILDER_CONFIGS = [
      _new_synthetic_config(TaskConfig(task=task, form=form, length=length,
                                       hops=DEFAULT_HOPS[task]), 0, None)
      for task in DEFAULT_HOPS for form in ("ids", "text") for length in PREDEFINED_LENGTHS]

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    config: SyntheticTasksConfig = self.builder_config
    splits = sources.synthetic_splits(config.task, config.split_sizes, config.base_seed)
    return {split: self._generate_examples(source) for split, source in splits.items()
            if len(source)}

  def _generate_examples(self, source: sources.ExampleSource):
    for i in range(len(source)):
      yield i, _record(source[i])


# --- RULER-HQA ----------------------------------------------------------------

HOTPOT_DEV_FILE = "hotpot_dev_distractor_v1.json"
RULER_HQA_SPLIT = "test"
PAPER_NUM_QUESTIONS = 128


def ruler_hqa_config_name(num_docs: int, num_questions: int = PAPER_NUM_QUESTIONS, seed: int = 0,
                          indices_file: str | None = None) -> str:
  """`docs{num_docs}`, plus `-q{questions}`, `-s{seed}`, `-{indices file stem}` when set."""
  name = f"docs{num_docs}"
  if num_questions != PAPER_NUM_QUESTIONS:
    name += f"-q{num_questions}"
  if seed:
    name += f"-s{seed}"
  if indices_file:
    name += "-" + os.path.splitext(os.path.basename(indices_file))[0]
  return name


@dataclasses.dataclass(eq=False, kw_only=True)
class RulerHqaConfig(tfds.core.BuilderConfig):
  """`build_ruler_hqa(rows, num_docs, num_questions, seed, indices)`; indices_file: a
  MemAgent eval file in manual_dir whose `index` fields pick the questions (their filtered
  set, e.g. eval_200.json), else the first num_questions dev rows."""
  num_docs: int = 50
  num_questions: int = PAPER_NUM_QUESTIONS
  seed: int = 0
  indices_file: str | None = None


def _new_ruler_hqa_config(num_docs: int, num_questions: int, seed: int,
                          indices_file: str | None) -> RulerHqaConfig:
  if num_docs < ruler_hqa.MIN_DOCS:
    raise ValueError(f"num_docs must be >= {ruler_hqa.MIN_DOCS}, got {num_docs}")
  if num_questions <= 0 or seed < 0:
    raise ValueError(f"need num_questions > 0 and seed >= 0, got {num_questions}, {seed}")
  return RulerHqaConfig(
      name=ruler_hqa_config_name(num_docs, num_questions, seed, indices_file), num_docs=num_docs,
      num_questions=num_questions, seed=seed, indices_file=indices_file,
      description=f"{num_questions} questions, {num_docs} documents each, seed {seed}"
                  + (f", questions from {indices_file}" if indices_file else ""))


def ruler_hqa_config(num_docs: int, num_questions: int = PAPER_NUM_QUESTIONS, seed: int = 0,
                     indices_file: str | None = None) -> RulerHqaConfig:
  """The builder config for any setting (the predefined object when one matches)."""
  config = _new_ruler_hqa_config(num_docs, num_questions, seed, indices_file)
  predefined = RulerHqa.builder_configs.get(config.name)
  return config if predefined is None else predefined


class RulerHqa(_ExampleBuilder):
  """RULER-HQA from a HotpotQA dev (distractor) file; one split, `test`.

  The construction: docs/architecture.md#evaluation-protocol."""

  DESCRIPTION = ("RULER-HQA: HotpotQA dev questions among other dev paragraphs, as "
                 "'Document i:' blocks (MemAgent's construction); one Example as JSON per record.")
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release: ruler_hqa.build_ruler_hqa.",
                   "1.1.0": "Each question's own paragraphs on MemAgent's slots "
                             "(random.Random(4)'s permutation), as its published files have them.",
                   "1.2.0": "Gold paragraphs cut after each supporting sentence: the oracle "
                             "memory gains a fact where its sentence ends, and labels stop at "
                             "the paragraph's last supporting sentence."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Place HotpotQA's dev set in the distractor setting, {HOTPOT_DEV_FILE}, in manual_dir "
      "(default: <data_dir>/downloads/manual). Configs with indices_file also need that "
      "MemAgent eval file (e.g. eval_200.json) there.")
  BUILDER_CONFIGS = [_new_ruler_hqa_config(n, PAPER_NUM_QUESTIONS, 0, None)
                     for n in ruler_hqa.PAPER_NUM_DOCS]

  def _split_generators(self, dl_manager):
    config: RulerHqaConfig = self.builder_config
    manual_dir = dl_manager.manual_dir
    rows = ruler_hqa.load_hotpotqa(_manual_file(manual_dir, HOTPOT_DEV_FILE))
    chosen = (list(range(len(rows))) if config.indices_file is None
              else ruler_hqa.checked_indices(
                  ruler_hqa.memagent_indices(_manual_file(manual_dir, config.indices_file)),
                  len(rows), source=f"the indices of {config.indices_file}"))
    if config.num_questions > len(chosen):
      raise ValueError(f"config {config.name} asks for {config.num_questions} questions but only "
                       f"{len(chosen)} are available")
    return {RULER_HQA_SPLIT: self._generate_examples(rows, chosen[:config.num_questions])}

  def _generate_examples(self, rows: Sequence[ruler_hqa.HotpotRow], chosen: Sequence[int]):
    # One question at a time keeps memory to one example (25600 documents is ~14 MB of text);
    # build_ruler_hqa seeds each question's layout by (seed, row) alone, so this equals the
    # batch build.
    config: RulerHqaConfig = self.builder_config
    for key, row in enumerate(chosen):
      example, = ruler_hqa.build_ruler_hqa(rows, config.num_docs, num_questions=1,
                                           seed=config.seed, indices=[row])
      yield key, _record(example)


# Beside a prepared RULER-HQA dataset: the content hashes of the manual files it was built from.
# TFDS reuses a prepared dataset by config name alone, which names the files but not their content.
SOURCES_RECORD = "memrecall_sources.json"


def prepare_ruler_hqa(config: RulerHqaConfig, data_dir: str, manual_dir: str) -> RulerHqa:
  """Builds `config` from the files in manual_dir, or reuses the dataset already prepared
  under its name in data_dir when it was built from the same files' content (a ValueError
  names the difference otherwise: another HotpotQA file would silently keep the old rows)."""
  builder = RulerHqa(config=config, data_dir=data_dir)
  names = [HOTPOT_DEV_FILE] + ([config.indices_file] if config.indices_file else [])
  made_from = {name: fingerprint.file_hash(_manual_file(pathlib.Path(manual_dir), name))
               for name in names}
  record = os.path.join(builder.data_dir, SOURCES_RECORD)
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    recorded = json.load(open(record, encoding="utf-8")) if os.path.exists(record) else None
    if recorded != made_from:
      raise ValueError(
          f"{builder.data_dir} was prepared from "
          + (f"other files (content {recorded})" if recorded else "unrecorded files")
          + f", not from {manual_dir}'s (content {made_from}): use another data_dir, or "
          "delete that directory to build it again")
    return builder
  prepare(builder, download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  with open(record, "w", encoding="utf-8") as f:
    json.dump(made_from, f)
  return builder


def prepare(builder: tfds.core.DatasetBuilder, **kwargs) -> None:
  """builder.download_and_prepare(**kwargs); a build that fails (a config asking for more
  questions than the file has, say) leaves no empty config folder behind it to look prepared."""
  config_dir = os.path.dirname(builder.data_dir)  # NAME/CONFIG, above the version folder
  existed = os.path.exists(config_dir)
  try:
    builder.download_and_prepare(**kwargs)
  except BaseException:
    if not existed and not any(files for _, _, files in os.walk(config_dir)):
      shutil.rmtree(config_dir, ignore_errors=True)
    raise


def _manual_file(manual_dir, name: str):
  path = manual_dir / name
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {RulerHqa.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return os.fspath(path)


# --- reading ------------------------------------------------------------------


class TfdsSource(sources.IndexedSource):
  """An ExampleSource over one split of a prepared array_record dataset."""

  def __init__(self, data_source, name: str = "tfds", directory: str = ""):
    self.data_source, self.name, self.directory = data_source, name, directory

  def __len__(self) -> int:
    return len(self.data_source)

  def _get(self, position: int) -> Example:
    return self.__getitems__([position])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    """A batch read (one array_record call), as grain-style loaders ask for."""
    positions = [self.position(i, len(self), self.name) for i in indices]
    try:
      records = self.data_source.__getitems__(positions)
      examples = [Example.from_json(r["example_json"]) for r in records]
    # array_record's errors for a damaged file, or what it read from one (records of None).
    except (RuntimeError, ValueError, OSError, TypeError, KeyError) as e:
      raise ruler_hqa.DatasetError(
          f"{self.name}: records {positions[:4]} of {self.directory} cannot be read "
          f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}); its files are "
          "damaged: move the directory aside and prepare the dataset again "
          "(launch/prepare_data.py)") from None
    return [self._checked(*args) for args in zip(positions, records, examples)]

  def _checked(self, position: int, record: Mapping[str, bytes], example: Example) -> Example:
    stored_id = record["id"].decode() if isinstance(record["id"], bytes) else record["id"]
    if stored_id != example.id:
      raise ValueError(f"{self.name}[{position}]: record id {stored_id!r} differs from its "
                       f"example's id {example.id!r}; the dataset is corrupt")
    return example

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {len(self)} examples)"


def tfds_source(builder: tfds.core.DatasetBuilder, split: str) -> TfdsSource:
  """Random access to `split` of a prepared builder, decoded to Examples (no TensorFlow)."""
  name = f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}:{split}"
  if not builder.is_prepared():
    raise FileNotFoundError(f"{name} is not prepared under {builder.data_dir}; "
                            "call download_and_prepare() first")
  if split not in builder.info.splits:
    raise KeyError(f"{name}: no split {split!r}; the dataset has {sorted(builder.info.splits)}")
  return TfdsSource(builder.as_data_source(split=split), name, builder.data_dir)
