"""Two processes on localhost (jax.distributed, 4 CPU devices each) equal one 8-device process,
and a preempted two-process run (SIGTERM to process 0 only) resumes to the same parameters."""

import json
import os
import socket
import subprocess
import sys

import flax.traverse_util
import numpy as np

from memrecall import run_builder
from memrecall.evaluate import evaluator
from memrecall.runtime import checkpoint
from memrecall.train import trainer
from tests.conftest import cpu_env
from tests.train.conftest import small_config
from tests.train.test_preemption import leaves, preempt_and_resume

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_evaluate_like_one(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(port),
                             str(i), str(tmp_path / "multi"), str(tmp_path / "multi_eval")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]

  # The same run in this process, on its 8 simulated devices.
  config = small_config("sft", steps=3)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  trainer.train(config, str(tmp_path / "single"), log=lambda *a: None)
  multi, _ = checkpoint.load_params(str(tmp_path / "multi"))  # written by 2 processes
  single, _ = checkpoint.load_params(str(tmp_path / "single"))
  flat_multi = flax.traverse_util.flatten_dict(multi)
  # Cross-process reductions sum in another order; Adam's normalised steps (3 x lr 3e-3)
  # can lift that rounding to ~1e-5, while a wrong row split moves parameters by ~1e-3.
  for key, value in flax.traverse_util.flatten_dict(single).items():
    np.testing.assert_allclose(np.asarray(flat_multi[key]), np.asarray(value), atol=2e-5,
                               err_msg=str(key))

  # One result file, equal (timings aside) to a single-process evaluation.
  eval_config = small_config("sft")
  eval_config.task.length = 32
  rows = evaluator.evaluate_suite(multi, run_builder.build_run(eval_config), model_name="lychee",
                                   lengths=[1], modes=["all", "gate"], examples=4, batch_size=2,
                                   latency_examples=1,  # timings are not compared
                                   output_dir=str(tmp_path / "single_eval"),
                                   baseline=evaluator.BaselineConfig(), log=lambda *a: None)
  written = json.load(open(tmp_path / "multi_eval" / "results.json"))
  timing = ("latency_s", "batched_s", "peak_bytes")
  strip = lambda rs: json.dumps([{k: v for k, v in r.items() if k not in timing} for r in rs])
  assert strip(written) == strip(rows)

  # An RL step with the rollout's weights split over tensor, chained from the two processes'
  # SFT workdir (every process reads the initial checkpoint's record: process 0 alone had
  # deadlocked orbax's barrier): the two processes sample what one process samples (the
  # rollouts' lengths and entropy, logged by process 0).
  rl = small_config("rl", steps=1, batch_size=8)
  rl.mesh.data, rl.mesh.fsdp = 2, 4
  rl.rl.rollout_weights = "tensor"
  rl.init.checkpoint = str(tmp_path / "multi")
  trainer.train(rl, str(tmp_path / "single_rl"), log=lambda *a: None)
  metrics = lambda d: json.loads(open(tmp_path / d / "logs" / "rl" / "metrics.jsonl").readline())
  two, one = metrics("multi_rl"), metrics("single_rl")
  assert two.keys() == one.keys() and one["response_length"] > 0
  for key in one:
    np.testing.assert_allclose(two[key], one[key], atol=1e-5, err_msg=key)

  # Preempted after step 1 of the same 3 (one two-process step takes seconds: the signal lands
  # first), resumed: bit for bit the uninterrupted two-process run.
  preempt_and_resume(tmp_path / "preempted", 3, processes=2, port=_free_port, at=1)
  resumed = leaves(tmp_path / "preempted")
  for key, value in leaves(tmp_path / "multi").items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=str(key))


def test_a_workdir_the_hosts_do_not_share_stops_training_before_any_step(tmp_path):
  """A local disk on each host: left to run, process 1 failed in orbax at the first checkpoint
  (600 s waiting for a directory only process 0's disk held), then process 0 at the shutdown
  barrier.  Both stop at the start, naming the workdir, leaving it empty."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(HERE), "launch", "train.py"),
       "--config=configs/tiny.py:sft", f"--workdir={tmp_path / f'host{i}'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=os.path.dirname(HERE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=cpu_env(devices=2)) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, out in enumerate(outs):
    assert procs[i].returncode == 2, out[-3000:]
    assert (f"workdir {tmp_path / f'host{i}'} must be on a file system every host sees: "
            f"process {i} does not see there the files process(es) {1 - i} made") in out, out
    assert os.listdir(tmp_path / f"host{i}") == []


_ONE_SIDED = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                           process_id=int(sys.argv[1]))
from memrecall.runtime import distributed
distributed.SHARED_DIRECTORY_WAIT_S = 1.0
if jax.process_index() == 0:  # a view that misses the other host's file (a late NFS listing)
  exists = os.path.exists
  distributed.os.path.exists = lambda p: not p.endswith("_00001") and exists(p)
try:
  distributed.check_shared_directory({directory!r}, "workdir")
except distributed.UnsharedDirectoryError as e:
  print("refused:", e, flush=True)
"""


def test_a_directory_one_host_cannot_see_into_stops_every_host():
  """Visibility that differs between hosts (process 0 misses process 1's probe, process 1 sees
  both): the processes decide together, so process 1 stops too instead of going on to wait at
  the run's next collective for a process that has left."""
  import tempfile
  with tempfile.TemporaryDirectory() as directory:
    script = _ONE_SIDED.format(root=os.path.dirname(HERE), port=_free_port(),
                               directory=directory)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=cpu_env(devices=1))
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert os.listdir(directory) == []  # each removed its probe
  assert all(p.returncode == 0 for p in procs), outs
  assert (f"refused: workdir {directory} must be on a file system every host sees: process 0 "
          "does not see there the files process(es) 1 made") in outs[0], outs[0]
  assert ("process 1 sees every probe, but process(es) 0 do not see all of them") in outs[1], \
      outs[1]
