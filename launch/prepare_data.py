r"""Builds a TFDS dataset of memrecall's builders once, for every host to stream (`tfds:DIR` data).

  python launch/prepare_data.py --builder=ruler_hqa --num_docs=50 \
      --manual_dir=/data/hotpotqa --data_dir=/data/tfds
  python launch/prepare_data.py --builder=synthetic --task=multihop --form=text --length=2048 \
      --data_dir=/data/tfds

Written as array_record without TensorFlow (`pip install -e ".[data]"`).  Prints the prepared
version directory: pass it as `--config.data.train=tfds:DIR` or `launch/eval.py --data=tfds:DIR`
(RULER-HQA's one split is `test`).  Rebuilding an existing dataset is a no-op.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BUILDER = flags.DEFINE_enum("builder", None, ["ruler_hqa", "synthetic"], "Which dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where TFDS writes the dataset.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "ruler_hqa: the folder holding hotpot_dev_distractor_v1.json (and the "
    "--indices_file).")
_NUM_DOCS = flags.DEFINE_integer("num_docs", 50, "ruler_hqa: documents per question.",
                                 lower_bound=1)
_NUM_QUESTIONS = flags.DEFINE_integer("num_questions", 128, "ruler_hqa: questions.",
                                      lower_bound=1)
_INDICES_FILE = flags.DEFINE_string(
    "indices_file", None, "ruler_hqa: a MemAgent eval file in --manual_dir whose `index` fields "
    "pick the questions (e.g. eval_200.json).")
_SEED = flags.DEFINE_integer("seed", 0, "Layout (ruler_hqa) or base (synthetic) seed.")
_TASK = flags.DEFINE_string("task", "multihop", "synthetic: multihop, vartrack or hotpot.")
_FORM = flags.DEFINE_enum("form", "text", ["text", "ids"], "synthetic: text or ids.")
_LENGTH = flags.DEFINE_integer("length", 2048, "synthetic: context tokens.")
_HOPS = flags.DEFINE_integer("hops", None, "synthetic: hops (default: the task's).")
flags.mark_flags_as_required(["builder", "data_dir"])

from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help

def main(argv):
  del argv
  try:
    import tensorflow_datasets as tfds
    from memrecall.data import tfds_builders
    from memrecall.data.synthetic import TaskConfig
  except ImportError as e:
    raise app.UsageError(f"{e}: pip install -e '.[data]'") from None
  cli.writable("data_dir", _DATA_DIR.value, directory=True)
  if _HOPS.value is not None and _HOPS.value < 1:
    raise app.UsageError(f"--hops={_HOPS.value}: a question needs at least one hop")
  try:
    if _BUILDER.value == "ruler_hqa":
      if not _MANUAL_DIR.value:
        raise app.UsageError("--builder=ruler_hqa needs --manual_dir (the HotpotQA dev file)")
      for name in (tfds_builders.HOTPOT_DEV_FILE, _INDICES_FILE.value):
        if name and not os.path.isfile(os.path.join(_MANUAL_DIR.value, name)):
          raise app.UsageError(f"--manual_dir: {_MANUAL_DIR.value} holds no {name}")
      config = tfds_builders.ruler_hqa_config(_NUM_DOCS.value, _NUM_QUESTIONS.value, _SEED.value,
                                              _INDICES_FILE.value)
      builder = tfds_builders.prepare_ruler_hqa(config, _DATA_DIR.value, _MANUAL_DIR.value)
    else:
      hops = _HOPS.value if _HOPS.value is not None else tfds_builders.DEFAULT_HOPS.get(
          _TASK.value, 2)
      try:
        task = TaskConfig(task=_TASK.value, form=_FORM.value, length=_LENGTH.value, hops=hops)
      except ValueError as e:
        raise app.UsageError(f"--task={_TASK.value} --form={_FORM.value} --length={_LENGTH.value} "
                             f"--hops={hops}: {e}") from None
      builder = tfds_builders.SyntheticTasks(config=tfds_builders.synthetic_config(task, _SEED.value),
                                             data_dir=_DATA_DIR.value)
      tfds_builders.prepare(builder)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f"prepared {builder.name}/{builder.builder_config.name}: {splits}")
  print(builder.data_dir)


if __name__ == "__main__":
  cli.run(main)
