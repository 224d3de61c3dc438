"""SIGTERM mid-run (a preemption notice): the step is saved whole, and the rerun finishes exactly
as an uninterrupted run — in one process and in two (jax.distributed, 4 devices each)."""

import os
import socket
import subprocess
import sys

import flax.traverse_util
import numpy as np
import pytest

from memrecall.train import checkpoint, trainer

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "preempt_worker.py")
# Many more steps than run before the signal (step 3), so a run cannot finish first; two
# processes step ~20x slower (gloo collectives on 2 cores).
STEPS = {1: 60, 2: 12}
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, processes: int, port: int):
  extra = lambda i: [str(port), str(i)] if processes > 1 else []
  return [subprocess.Popen([sys.executable, WORKER, str(workdir), str(STEPS[processes]),
                            *extra(i)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
          for i in range(processes)]


def _finish(procs, timeout=900):
  outs = [p.communicate(timeout=timeout) for p in procs]
  return [p.returncode for p in procs], outs


def _leaves(workdir):
  params, _ = checkpoint.load_params(str(workdir))
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_the_step_and_the_rerun_equals_an_uninterrupted_run(tmp_path, processes):
  codes, outs = _finish(_start(tmp_path / "full", processes, _port()))
  assert codes == [0] * processes, [o[1][-2000:] for o in outs]

  procs = _start(tmp_path / "run", processes, _port())
  for line in procs[0].stdout:  # process 0 logs every step
    if line.startswith("step 3/"):
      procs[0].send_signal(15)  # only process 0 is told: every process must stop with it
      break
  codes, outs = _finish(procs)
  assert codes == [trainer.PREEMPTED_EXIT_CODE] * processes, [o[1][-2000:] for o in outs]
  assert "preempted: saved step" in outs[0][1]
  saved = os.listdir(tmp_path / "run" / "checkpoints")  # only whole checkpoints, no tmp dirs
  assert all(name.isdigit() for name in saved), saved
  assert 3 <= max(map(int, saved)) < STEPS[processes], saved
  last = tmp_path / "run" / "checkpoints" / str(max(map(int, saved)))
  assert {"config", "data", "state"} <= set(os.listdir(last)), os.listdir(last)

  codes, outs = _finish(_start(tmp_path / "run", processes, _port()))
  assert codes == [0] * processes, [o[1][-2000:] for o in outs]
  assert "resumed from" in outs[0][0]
  full, resumed = _leaves(tmp_path / "full"), _leaves(tmp_path / "run")
  for key, value in full.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=str(key))
