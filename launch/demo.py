r"""The README's main job: `python launch/demo.py --workdir=WORKDIR [--variant=full]`.

Trains the tiny model through every stage and evaluates it from 1x to 256x its
training length; see memrecall/demo.py.  Rerunning reuses finished stages.
"""

import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Where every stage writes.")
_VARIANT = flags.DEFINE_enum("variant", "default", ["default", "full"],
                             "default: about 8 minutes on 2 CPU cores; full: longer budgets, about an hour.")

from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help

def main(argv):
  del argv
  cli.writable("workdir", _WORKDIR.value, directory=True)
  logging.set_verbosity(logging.WARNING)
  from configs import tiny
  from memrecall import demo
  demo.run_demo(tiny.get_config, _WORKDIR.value, _VARIANT.value)


if __name__ == "__main__":
  cli.run(main)
