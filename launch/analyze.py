r"""Draws one evaluated question: gate score per chunk, which chunks were read, the memory.

  python launch/analyze.py --checkpoint=workdir/demo/gate \
      --trace=workdir/demo/eval/traces/lychee-gate-8x.json --question=0 --output=q0.png

Paths and the question are checked before the run's config is read (no weight is read);
errors are one line (--verbose: tracebacks).
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of the trained run (orbax).")
_TRACE = flags.DEFINE_string("trace", None, "An evaluation's traces/*.json.")
_QUESTION = flags.DEFINE_integer("question", 0, "Which traced question.", lower_bound=0)
_OUTPUT = flags.DEFINE_string("output", "question.png", "Where to write the PNG.")
flags.mark_flags_as_required(["checkpoint", "trace"])
from launch import cli  # noqa: E402  (--verbose and one-line errors)
flags.adopt_module_key_flags(cli)  # its flags in --help


def main(argv):
  del argv
  from memrecall import run_builder
  from memrecall.evaluate import traces
  cli.readable("checkpoint", _CHECKPOINT.value)
  cli.readable("trace", _TRACE.value)
  cli.writable("output", _OUTPUT.value)
  trace = traces.load_trace(_TRACE.value, _QUESTION.value)
  # The run's tokenizer and task, not its weights: small-vocabulary tasks decode to their
  # token names, text tasks through the tokenizer.
  run, _ = run_builder.workdir_run(_CHECKPOINT.value)
  print(traces.plot_question(trace, _OUTPUT.value, decode=run.decode))
  for chunk, memory in traces.memory_changes(trace):
    print(f"after chunk {chunk}: {run.decode(memory)}")

if __name__ == "__main__":
  cli.run(main)
