r"""Trains one stage: `python launch/train.py --config=configs/tiny.py:sft --workdir=/tmp/run`.

Override any config field on the command line (`--config.train.steps=500`,
`--config.init.checkpoint=/tmp/sft_run`).  Rerunning the same command on the
same workdir resumes from its latest checkpoint (a config that changes the run
itself, not just its budget, optimizer or mesh, is refused).  Bad flags, config
keys and paths are one-line errors before any work; --verbose shows tracebacks.  On SIGTERM or SIGINT (a
preemption notice) the run finishes its step, saves it and exits with status 75
("resume me"; launch/slurm_gpu.sh and launch/tpu_pod.sh rerun it).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file and its argument (configs/tiny.py:sft, "
    "configs/lychee.py:rl,7b,gpu8). Any key is set with --config.BLOCK.KEY=VALUE: the blocks and "
    "their defaults are run_builder.with_defaults's (memrecall/run_builder.py), each described "
    "in docs/training.md#train.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and metrics go here.")
from launch import cli, distributed_flags  # noqa: E402  (--verbose; --distributed and the coordinator flags)
flags.adopt_module_key_flags(cli)  # its flags in --help
flags.adopt_module_key_flags(distributed_flags)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
  from memrecall.models.config import ConfigError
  from memrecall.data.ruler_hqa import DatasetError
  from memrecall.train import trainer
  from memrecall.train.batches import BatchError
  distributed_flags.initialize()
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DatasetError, BatchError, OSError, ImportError) as e:
    raise app.UsageError(str(e)) from None
  except trainer.Preempted as e:
    print(f"[memrecall] {e}", file=sys.stderr, flush=True)
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main)
