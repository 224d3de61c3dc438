"""One process of the 2-process CPU tests: `python multihost_worker.py PORT ID WORKDIR EVALDIR`.

Each process has 4 simulated CPU devices; together they form the 8-device mesh
of the single-process tests.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")  # as tests/conftest.py
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

port, process_id, workdir, evaldir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)
assert jax.device_count() == 8 and jax.local_device_count() == 4

from memrecall.evaluate import evaluator
from memrecall import run_builder  # noqa: E402
from memrecall.runtime import checkpoint  # noqa: E402
from memrecall.train import trainer  # noqa: E402
from tests.train.conftest import small_config  # noqa: E402

config = small_config("sft", steps=3)
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
trainer.train(config, workdir, log=lambda *a: None)

params, _ = checkpoint.load_params(workdir)
eval_config = small_config("sft")
eval_config.task.length = 32
run = run_builder.build_run(eval_config)
evaluator.evaluate_suite(params, run, model_name="lychee", lengths=[1], modes=["all", "gate"],
                          examples=4, batch_size=2, latency_examples=1, output_dir=evaldir,
                          baseline=evaluator.BaselineConfig(), log=lambda *a: None)
# One RL step whose rollout runs on its weights split over a tensor axis of the 8 devices
# (data 4 x tensor 2), its rows across both processes, chained from the SFT stage above
# (`init.checkpoint`, as a pod's stages chain).
rl = small_config("rl", steps=1, batch_size=8)
rl.mesh.data, rl.mesh.fsdp = 2, 4
rl.rl.rollout_weights = "tensor"
rl.init.checkpoint = workdir
trainer.train(rl, workdir + "_rl", log=lambda *a: None)
print(f"process {process_id} done")
