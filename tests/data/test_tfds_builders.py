"""TFDS builders: build into a temporary data_dir, read back as array_record, no TensorFlow."""

import glob
import json
import os
import re
import shutil
import sys

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from memrecall.data import ruler_hqa, sources  # noqa: E402
from memrecall.data import tfds_builders as tb  # noqa: E402
from memrecall.data.synthetic import TaskConfig  # noqa: E402

DatasetError = ruler_hqa.DatasetError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "tfds_hotpot_mini.json")
SIZES = {"train": 23, "validation": 5, "test": 7}
TASKS = {"ids": TaskConfig(task="multihop", form="ids", length=128, hops=2, distractor_density=0.5),
         "text": TaskConfig(task="vartrack", form="text", length=300, hops=3)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", params=sorted(TASKS))
def synthetic(request, data_dir):
  """A prepared builder (three shards per split, to check order across shards) and its task."""
  task = TASKS[request.param]
  builder = tb.SyntheticTasks(config=tb.synthetic_config(task, base_seed=2, split_sizes=SIZES),
                              data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
  return builder, task


def _jsons(source):
  return [e.to_json() for e in source]


def test_builds_and_reads_without_tensorflow(synthetic):
  builder, _ = synthetic
  assert "tensorflow" not in sys.modules
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert {s: builder.info.splits[s].num_examples for s in SIZES} == SIZES
  assert len(builder.info.splits["train"].filenames) == 3
  assert "tensorflow" not in sys.modules


def test_read_back_equals_the_python_generator(synthetic, data_dir):
  builder, task = synthetic
  expected = sources.synthetic_splits(task, SIZES, base_seed=2)
  for split in SIZES:
    source = tb.tfds_source(builder, split)
    assert isinstance(source, sources.ExampleSource) and len(source) == SIZES[split]
    assert _jsons(source) == _jsons(expected[split]), split
    # Random access, negative indices and batch reads map to the same examples.
    order = [4, 0, -1, 2]
    assert [source[i].to_json() for i in order] == [expected[split][i].to_json() for i in order]
    assert _jsons(source.__getitems__(order)) == [expected[split][i].to_json() for i in order]
  # A fresh builder over the same data_dir (no file_format given) reads the same.
  again = tb.SyntheticTasks(config=builder.builder_config, data_dir=data_dir)
  assert again.is_prepared()
  assert _jsons(tb.tfds_source(again, "test")) == _jsons(expected["test"])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 6, 30])
def test_host_shards_of_a_tfds_split(synthetic, count):
  builder, task = synthetic
  source = tb.tfds_source(builder, "train")
  expected = _jsons(sources.synthetic_splits(task, SIZES, base_seed=2)["train"])
  shards = [_jsons(sources.shard_for_host(source, p, count)) for p in range(count)]
  assert sorted(j for s in shards for j in s) == sorted(expected)
  assert sum(map(len, shards)) == len(set(expected)) == SIZES["train"]
  for p, shard in enumerate(shards):
    assert shard == expected[p::count]


def test_config_names_and_predefined_configs():
  assert tb.synthetic_config_name(TaskConfig(length=256)) == "multihop-ids-L256-h2-d100"
  predefined = tb.synthetic_config(TaskConfig(length=256))
  assert predefined is tb.SyntheticTasks.builder_configs["multihop-ids-L256-h2-d100"]
  assert predefined.split_sizes == tb.SHORT_SPLIT_SIZES
  assert "train" not in tb.synthetic_config(TaskConfig(length=16384)).split_sizes
  names = {tb.synthetic_config(t).name for t in (
      TaskConfig(distractor_density=0.3), TaskConfig(distractor_density=0.333),
      TaskConfig(num_entities=32), TaskConfig(hops=3), TaskConfig(min_fact_gap=16),
      TaskConfig(chain_distractors=True))}
  assert names == {"multihop-ids-L256-h2-d30", "multihop-ids-L256-h2-d33.3",
                   "multihop-ids-L256-h2-d100-e32", "multihop-ids-L256-h3-d100",
                   "multihop-ids-L256-h2-d100-g16", "multihop-ids-L256-h2-d100-c"}
  assert tb.synthetic_config(TASKS["ids"], 2, SIZES).name == (
      "multihop-ids-L128-h2-d50-s2-train23-validation5-test7")
  configs = tb.SyntheticTasks.BUILDER_CONFIGS
  assert len({c.name for c in configs}) == len(configs) == 18
  with pytest.raises(ValueError, match="unknown splits"):
    tb.synthetic_config(TaskConfig(), split_sizes={"dev": 3})
  assert [c.name for c in tb.RulerHqa.BUILDER_CONFIGS][::9] == ["docs50", "docs25600"]
  assert tb.ruler_hqa_config(200) is tb.RulerHqa.builder_configs["docs200"]
  assert tb.ruler_hqa_config(50, 12, 1, "eval_200.json").name == "docs50-q12-s1-eval_200"


def test_tfds_source_errors(data_dir, synthetic):
  builder, _ = synthetic
  with pytest.raises(KeyError, match="no split 'dev'"):
    tb.tfds_source(builder, "dev")
  unbuilt = tb.SyntheticTasks(config=tb.synthetic_config(TaskConfig(length=64),
                                                         split_sizes={"test": 1}),
                              data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tb.tfds_source(unbuilt, "test")


def test_a_damaged_record_file_is_named_with_its_dataset(tmp_path):
  builder = tb.SyntheticTasks(config=tb.synthetic_config(TaskConfig(length=64),
                                                         split_sizes={"test": 2}),
                              data_dir=str(tmp_path))
  builder.download_and_prepare()
  (record,) = glob.glob(os.path.join(builder.data_dir, "*test.array_record*"))
  with open(record, "r+b") as f:  # a copy cut short
    f.truncate(os.path.getsize(record) // 2)
  source = tb.tfds_source(builder, "test")
  with pytest.raises(DatasetError, match=rf"records \[1\] of {re.escape(builder.data_dir)} cannot "
                                         r"be read .*prepare the dataset again"):
    source[1]


@pytest.fixture(scope="module")
def hotpot_dirs(tmp_path_factory):
  """(data_dir, manual_dir) with the mini HotpotQA file under its expected name."""
  root = tmp_path_factory.mktemp("ruler")
  manual = root / "manual"
  manual.mkdir()
  shutil.copy(FIXTURE, manual / tb.HOTPOT_DEV_FILE)
  return str(root / "data"), str(manual)


def _build_ruler(config, hotpot_dirs):
  data_dir, manual = hotpot_dirs
  return tb.prepare_ruler_hqa(config, data_dir, manual)


def test_ruler_hqa_builds_from_manual_dir(hotpot_dirs):
  rows = ruler_hqa.load_hotpotqa(FIXTURE)
  builder = _build_ruler(tb.ruler_hqa_config(50, num_questions=12, seed=3), hotpot_dirs)
  source = tb.tfds_source(builder, tb.RULER_HQA_SPLIT)
  expected = ruler_hqa.build_ruler_hqa(rows, 50, num_questions=12, seed=3)
  assert len(source) == 12 and _jsons(source) == _jsons(expected)
  assert all(e.context.count("\n\nDocument ") == 49 and e.supporting for e in source)
  assert source[-1].metadata["hotpot_id"] == rows[11].id


def test_ruler_hqa_question_set_from_an_indices_file(hotpot_dirs):
  _, manual = hotpot_dirs
  with open(os.path.join(manual, "eval_mini.json"), "w") as f:
    json.dump([{"index": 11}, {"index": 3}, {"index": 5}], f)
  builder = _build_ruler(tb.ruler_hqa_config(100, 2, indices_file="eval_mini.json"), hotpot_dirs)
  expected = ruler_hqa.build_ruler_hqa(ruler_hqa.load_hotpotqa(FIXTURE), 100, 2, indices=[11, 3])
  assert _jsons(tb.tfds_source(builder, "test")) == _jsons(expected)
  # A repeated row would count one question twice: refused, as build_ruler_hqa refuses it.
  with open(os.path.join(manual, "eval_dup.json"), "w") as f:
    json.dump([{"index": 3}, {"index": 3}, {"index": 99}], f)
  with pytest.raises(ValueError, match=r"eval_dup.json must be distinct .*repeated \[3\]; "
                                       r"outside \[99\]"):
    _build_ruler(tb.ruler_hqa_config(100, 2, indices_file="eval_dup.json"), hotpot_dirs)


def test_ruler_hqa_is_reused_only_from_the_same_files(hotpot_dirs, tmp_path):
  data_dir, manual = hotpot_dirs
  config = tb.ruler_hqa_config(50, num_questions=5)
  built = _build_ruler(config, hotpot_dirs)
  first = _jsons(tb.tfds_source(built, "test"))
  assert _jsons(tb.tfds_source(_build_ruler(config, hotpot_dirs), "test")) == first  # reused
  changed = tmp_path / "changed"
  changed.mkdir()
  rows = json.load(open(FIXTURE))
  rows[0]["answer"] = "CHANGED " + rows[0]["answer"]
  json.dump(rows, open(changed / tb.HOTPOT_DEV_FILE, "w"))
  with pytest.raises(ValueError, match="was prepared from other files"):
    tb.prepare_ruler_hqa(config, data_dir, str(changed))
  assert _jsons(tb.tfds_source(built, "test")) == first  # nothing rebuilt or lost


def test_ruler_hqa_errors_name_the_problem(hotpot_dirs, tmp_path):
  with pytest.raises(ValueError, match="13 questions but only 12"):
    _build_ruler(tb.ruler_hqa_config(50, num_questions=13), hotpot_dirs)
  # No empty config folder is left to look prepared.
  config = tb.ruler_hqa_config(50, num_questions=13)
  assert not os.path.exists(os.path.join(hotpot_dirs[0], "ruler_hqa", config.name))
  empty = tmp_path / "manual"
  empty.mkdir()
  (empty / "README").write_text("not the dev set")
  builder = tb.RulerHqa(config=tb.ruler_hqa_config(50, 4), data_dir=str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match=tb.HOTPOT_DEV_FILE):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(empty)))


def test_missing_importlib_resources_is_named(data_dir, monkeypatch):
  # tensorflow-datasets needs it to build but does not declare it (tensorflow/datasets#11212).
  monkeypatch.setitem(sys.modules, "importlib_resources", None)
  builder = tb.SyntheticTasks(config=tb.synthetic_config(TaskConfig(length=64),
                                                         split_sizes={"test": 1}),
                              data_dir=data_dir)
  with pytest.raises(ImportError, match="pip install importlib_resources"):
    builder.download_and_prepare()
