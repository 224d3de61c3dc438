"""SIGTERM mid-run (a preemption notice): the step is saved whole, and the rerun finishes exactly
as an uninterrupted run.  The two-process case (only process 0 signalled) is in
tests/test_multihost.py, beside the uninterrupted two-process run it is compared with."""

import glob
import json
import os
import subprocess
import sys

import flax.traverse_util
import numpy as np

from memrecall.runtime import checkpoint
from memrecall.train import trainer

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "preempt_worker.py")
STEPS = 60  # many more than run before the signal (step 3): the run cannot finish first
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def start(workdir, steps: int, processes: int = 1, port: int = 0):
  """The preemptible training run in `processes` processes (tests/preempt_worker.py)."""
  extra = lambda i: [str(port), str(i)] if processes > 1 else []
  return [subprocess.Popen([sys.executable, WORKER, str(workdir), str(steps), *extra(i)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
          for i in range(processes)]


def finish(procs, timeout=900):
  outs = [p.communicate(timeout=timeout) for p in procs]
  return [p.returncode for p in procs], outs


def preempt_and_resume(workdir, steps: int, processes: int = 1, port=lambda: 0, at: int = 3):
  """SIGTERM to process 0 once it logged step `at`; checks the stop, then reruns the command.
  Returns the rerun's outputs."""
  procs = start(workdir, steps, processes, port())
  for line in procs[0].stdout:  # process 0 logs every step
    if line.startswith(f"step {at}/"):
      procs[0].send_signal(15)  # only process 0 is told: every process must stop with it
      break
  codes, outs = finish(procs)
  assert codes == [trainer.PREEMPTED_EXIT_CODE] * processes, [o[1][-2000:] for o in outs]
  assert "preempted: saved step" in outs[0][1]
  saved = os.listdir(workdir / "checkpoints")  # only whole checkpoints, no tmp dirs
  assert all(name.isdigit() for name in saved), saved
  assert at <= max(map(int, saved)) < steps, saved
  last = workdir / "checkpoints" / str(max(map(int, saved)))
  assert {"config", "data", "state"} <= set(os.listdir(last)), os.listdir(last)
  codes, outs = finish(start(workdir, steps, processes, port()))
  assert codes == [0] * processes, [o[1][-2000:] for o in outs]
  assert "resumed from" in outs[0][0]
  return outs


def leaves(workdir):
  params, _ = checkpoint.load_params(str(workdir))
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def test_sigterm_saves_the_step_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
  codes, outs = finish(start(tmp_path / "full", STEPS))
  assert codes == [0], outs[0][1][-2000:]
  preempt_and_resume(tmp_path / "run", STEPS)
  full, resumed = leaves(tmp_path / "full"), leaves(tmp_path / "run")
  for key, value in full.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=str(key))
  # Logs: TensorBoard events and the JSON lines, one row per step of each run.
  rows = [json.loads(l) for l in open(tmp_path / "full" / "logs" / "sft" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all("loss" in r for r in rows)
  assert glob.glob(str(tmp_path / "full" / "logs" / "sft" / "events.out.tfevents.*"))
