"""memrecall.runtime.distributed.initialize under SLURM (fake environment variables; JAX's
jax.distributed.initialize replaced by a recorder): which GPUs each process drives, and the
refusal of a GPU job whose backend fell back to the CPU."""

import jax
import pytest

from memrecall.runtime import distributed

# What srun sets for a task of `sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1`.
ONE_PER_NODE = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-004]",
                "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                "SLURM_NODEID": "2", "SLURM_STEP_NUM_NODES": "4", "SLURM_NNODES": "4",
                "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_TASKS_PER_NODE": "1(x4)",
                "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8",
                "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
# ... and of `--ntasks-per-node=8` (one task per GPU, every GPU visible to each): task 13.
ONE_PER_GPU = {**ONE_PER_NODE, "SLURM_NTASKS": "32", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
               "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x4)",
               "SLURM_TASKS_PER_NODE": "8(x4)", "SLURM_NTASKS_PER_NODE": "8"}
SLURM_VARIABLES = set(ONE_PER_NODE) | {"JAX_LOCAL_DEVICE_IDS", "JAX_PLATFORMS"}


@pytest.fixture
def slurm(monkeypatch):
  """Sets a fake SLURM environment (clearing the real one) and records the arguments of
  jax.distributed.initialize instead of calling it; the backend check is left out here."""
  calls = []

  def use(env):
    for name in SLURM_VARIABLES:
      monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
      monkeypatch.setenv(name, value)
    return calls

  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # no gloo switch in this process
  monkeypatch.setattr(distributed, "check_gpu_backend", lambda: None)
  return use


def test_one_task_per_node_drives_every_gpu_of_its_node(slurm):
  calls = slurm(ONE_PER_NODE)
  distributed.initialize(True)
  # JAX's own detection would give this task [SLURM_LOCALID] = [0]: 1 of its node's 8 GPUs.
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                    "local_device_ids": list(range(8))}]


def test_one_task_per_node_with_explicit_coordinator_flags(slurm):
  calls = slurm(ONE_PER_NODE)
  distributed.initialize(False, "node001:1234", 4, 2)
  assert calls[0]["local_device_ids"] == list(range(8))
  assert calls[0]["coordinator_address"] == "node001:1234"


@pytest.mark.parametrize("env", [
    {"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1",
     "SLURM_NTASKS": "3", "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": ""},
    {"SLURM_STEP_TASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS_PER_NODE": ""},
    {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c,GPU-d"},  # ids are renumbered 0..n-1 by CUDA
])
def test_a_task_alone_on_its_node_is_recognised_however_slurm_says_it(slurm, env):
  calls = slurm({**ONE_PER_NODE, **env})
  distributed.initialize(True)
  gpus = len(env.get("CUDA_VISIBLE_DEVICES", ONE_PER_NODE["CUDA_VISIBLE_DEVICES"]).split(","))
  assert calls[0]["local_device_ids"] == list(range(gpus))


def test_one_task_per_gpu_is_left_to_jax(slurm):
  calls = slurm(ONE_PER_GPU)
  distributed.initialize(True)
  assert calls[0]["local_device_ids"] is None  # JAX then gives task 13 GPU SLURM_LOCALID = 5
  from jax._src.clusters import ClusterEnv  # pylint: disable=g-import-not-at-top
  assert ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, 300)[3] == [5]


def test_a_task_bound_to_one_gpu_drives_that_gpu(slurm):
  # --gpus-per-task=1: SLURM shows each task only its GPU, which CUDA numbers 0.
  calls = slurm({**ONE_PER_GPU, "CUDA_VISIBLE_DEVICES": "5"})
  distributed.initialize(True)
  assert calls[0]["local_device_ids"] == [0]


@pytest.mark.parametrize("env", [
    {name: value for name, value in ONE_PER_NODE.items() if name != "SLURM_JOB_ID"},  # no SLURM
    {**ONE_PER_NODE, "JAX_LOCAL_DEVICE_IDS": "0,1"},  # the user's choice, applied by JAX
    {**ONE_PER_NODE, "CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0"},  # no GPUs
])
def test_other_environments_are_left_to_jax(slurm, env):
  calls = slurm(env)
  distributed.initialize(True)
  assert calls[0]["local_device_ids"] is None


def test_a_slurm_gpu_job_on_the_cpu_backend_is_refused(monkeypatch):
  for name in SLURM_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  for name, value in ONE_PER_NODE.items():
    monkeypatch.setenv(name, value)
  assert jax.default_backend() == "cpu"  # this test process's backend: a jax without CUDA
  with pytest.raises(RuntimeError, match=r"has GPUs \(SLURM_GPUS_ON_NODE=8\) but jax started "
                     r"on the CPU.*jax\[cuda12\]"):
    distributed.check_gpu_backend()


def test_a_job_given_gpu_0_alone_is_checked_too():
  with pytest.raises(RuntimeError, match=r"\(CUDA_VISIBLE_DEVICES=0\)"):
    distributed.check_gpu_backend({"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0"})


def test_the_cpu_asked_for_or_no_gpus_given_passes():
  env = {**ONE_PER_NODE, "SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_GPUS": "",
         "CUDA_VISIBLE_DEVICES": ""}
  distributed.check_gpu_backend(env)  # a CPU-only SLURM job
  distributed.check_gpu_backend({k: v for k, v in ONE_PER_NODE.items() if k != "SLURM_JOB_ID"})
  distributed.check_gpu_backend({**ONE_PER_NODE, "JAX_PLATFORMS": "cpu"})  # on purpose


def test_initialize_checks_the_backend_after_jax_distributed(monkeypatch):
  """The backend check must follow jax.distributed.initialize: asking for the backend starts
  it, and jax.distributed.initialize refuses to run after that."""
  order = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: order.append("initialize"))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  monkeypatch.setattr(distributed, "check_gpu_backend", lambda: order.append("check"))
  distributed.initialize(True)
  assert order == ["initialize", "check"]
