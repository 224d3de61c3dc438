"""A training run that may be preempted: `python preempt_worker.py WORKDIR STEPS [PORT ID]`.

Without PORT and ID: one process on one device.  With them: one of two processes
(jax.distributed on localhost, 4 simulated CPU devices each, the 8-device mesh of
tests/test_multihost.py).  Logs every step on stdout (process 0); exits with the trainer's
PREEMPTED_EXIT_CODE when a SIGTERM stopped it.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
multi = len(sys.argv) > 3
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if multi else 1}"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")  # as tests/conftest.py
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if multi:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2,
                             process_id=int(sys.argv[4]))

from memrecall.train import trainer  # noqa: E402
from tests.train.conftest import small_config  # noqa: E402

config = small_config("sft", steps=int(sys.argv[2]), checkpoint_every=1000,
                      async_checkpoint=True)
if multi:
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
try:
  trainer.train(config, sys.argv[1], log=lambda line: print(line, flush=True))
except trainer.Preempted as e:
  print(f"[memrecall] {e}", file=sys.stderr, flush=True)
  sys.exit(trainer.PREEMPTED_EXIT_CODE)
