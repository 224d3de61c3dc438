"""JAX's multi-controller runtime: one process per host, every host running the same program.

`initialize` wraps `jax.distributed.initialize`: with no arguments JAX detects
Cloud TPU slices and SLURM jobs itself; other GPU clusters pass the
coordinator address, the process count and this process's id.  Under SLURM it
also chooses each process's GPUs (`slurm_local_device_ids`) and refuses a
backend that fell back to the CPU on GPU nodes.  The helpers
below keep the rest of memrecall single-host-shaped: each host builds only its
share of a batch, and only process 0 writes logs, metrics and results.
"""

from __future__ import annotations

import os
import re
import secrets
import time

import jax
import numpy as np

from memrecall.runtime.sharding import MeshError


def initialize(enabled: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Initialises the distributed runtime when `enabled` or a coordinator is given (with no
  coordinator, JAX detects Cloud TPU slices and SLURM jobs itself)."""
  if not (enabled or coordinator_address):
    return
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together")
  # Cross-process collectives for the CPU backend (jax's default from 0.12; harmless where the
  # model runs on accelerators).  Not decided by asking for the backend: that would start it,
  # and jax.distributed.initialize must come before anything does.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=slurm_local_device_ids())
  check_gpu_backend()


_SLURM_TASK = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")  # what jax's SLURM detection reads


def _slurm_gpus(env) -> int:
  """How many GPUs this SLURM task sees: CUDA_VISIBLE_DEVICES's entries (CUDA numbers them
  0..n-1 whatever the ids), else SLURM_GPUS_ON_NODE; 0 when SLURM gave none."""
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [v for v in visible.split(",") if v.strip() and v.strip() not in ("NoDevFiles", "-1")]
    return len(ids)
  count = env.get("SLURM_GPUS_ON_NODE", "")
  return int(count) if count.isdigit() else 0


def _slurm_tasks_on_node(env) -> int | None:
  """How many tasks of this job step run on this node (None when SLURM does not say):
  SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE, e.g. `8(x4)` or `2,1`, indexed by
  SLURM_NODEID; else 1 when there are as many tasks as nodes; else SLURM_NTASKS_PER_NODE."""
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    counts = []
    for part in env.get(name, "").split(","):
      match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
      if not match:
        counts = []
        break
      counts += [int(match[1])] * int(match[2] or 1)
    node = env.get("SLURM_NODEID", "")
    if counts and len(set(counts)) == 1:
      return counts[0]
    if counts and node.isdigit() and int(node) < len(counts):
      return counts[int(node)]
  tasks = env.get("SLURM_NTASKS", "")
  nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
  if tasks.isdigit() and nodes.isdigit() and int(tasks) == int(nodes):
    return 1  # every node runs at least one task of a step
  per_node = env.get("SLURM_NTASKS_PER_NODE", "")
  return int(per_node) if per_node.isdigit() else None


def slurm_local_device_ids(env=None) -> list[int] | None:
  """The GPUs this process drives under SLURM, or None to leave the choice to JAX.

  JAX's SLURM detection gives each task one GPU, number SLURM_LOCALID: right for one task per
  GPU, but with one task per node (launch/slurm_gpu.sh) each process would drive GPU 0 alone,
  1 of its node's 8.  So a task alone on its node takes every GPU it sees, and a task that
  sees a single GPU (SLURM bound one to it: --gpus-per-task=1) takes that one, which JAX would
  misnumber by its SLURM_LOCALID.  JAX_LOCAL_DEVICE_IDS, when set, decides as in JAX."""
  env = os.environ if env is None else env
  if env.get("JAX_LOCAL_DEVICE_IDS") or not all(name in env for name in _SLURM_TASK):
    return None
  gpus = _slurm_gpus(env)
  if gpus and (gpus == 1 or _slurm_tasks_on_node(env) == 1):
    return list(range(gpus))
  return None


def check_gpu_backend(env=None) -> None:
  """Refuses a SLURM job given GPUs whose backend came up as the CPU (a jax without its CUDA
  plugin, or a plugin that failed to start): it would run, slowly and on one device per host,
  and jax's warning about it is hidden with the other library logs.  Call it after
  jax.distributed.initialize: asking for the backend starts it."""
  env = os.environ if env is None else env
  given = [f"{name}={env[name]}" for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS",
                                                "CUDA_VISIBLE_DEVICES")
           if env.get(name, "").strip() not in ("", "NoDevFiles", "-1")
           and not (name == "SLURM_GPUS_ON_NODE" and env[name].strip() == "0")]
  platforms = {p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()}
  if "SLURM_JOB_ID" not in env or not given or platforms == {"cpu"}:
    return  # not a SLURM GPU job, or the CPU asked for (JAX_PLATFORMS=cpu)
  if jax.default_backend() == "cpu":
    raise RuntimeError(
        f"the SLURM job has GPUs ({given[0]}) but jax started on the CPU: its "
        "CUDA plugin is missing or failed to start (--verbose shows jax's warning).  Install "
        "the CUDA build of jax into the job's environment (pip install 'jax[cuda12]', or "
        "'jax[cuda13]' for a CUDA 13 driver; launch/slurm_gpu.sh does when the venv has no "
        "plugin), or set JAX_PLATFORMS=cpu to run on the CPU on purpose")


def is_primary() -> bool:
  return jax.process_index() == 0


def round_robin(count: int, process: int | None = None, processes: int | None = None
                ) -> list[int]:
  """The indices of `count` rows that `process` (default: this one) owns: i with
  i mod processes == process.  Fixed by the index alone, so every process agrees without
  talking, a rerun gives each the same rows, and a row belongs to exactly one process."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  return list(range(process, count, processes))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op for one process)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


# How long a process looks for the others' probes before calling a directory unshared: a network
# file system may show a file another host has just made a few seconds late.
SHARED_DIRECTORY_WAIT_S = 10.0


class UnsharedDirectoryError(OSError):
  """A directory every process must write into as one is not one file system for all hosts:
  a bad path, so the launchers report it in one line (exit status 2)."""


def check_shared_directory(directory: str, flag: str) -> None:
  """Stops a multi-process run at its start when `directory` (the existing workdir or output
  directory of `flag`) is not one file system for every host, e.g. a local disk on each.

  Each process makes a probe file there named by a token process 0 draws, and after a barrier
  looks for every other's.  Left to run, training's first checkpoint stopped it: process 1
  waited 600 s in orbax for a directory only process 0's disk held, then process 0 failed at
  the shutdown barrier, neither error naming the cause; evaluation failed only after every host
  had evaluated its share.  The processes decide together (each one's count of unseen probes
  is gathered), so all of them stop or none does; each removes its own probe.  A no-op for one
  process."""
  processes = jax.process_count()
  if processes == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  probe = lambda p: os.path.join(directory, f".shared_probe_{token:08x}_{p:05d}")
  me = jax.process_index()
  open(probe(me), "w").close()
  try:
    barrier(f"memrecall.check_shared_directory {token}: probes made")
    deadline = time.monotonic() + SHARED_DIRECTORY_WAIT_S
    while True:
      unseen = [p for p in range(processes) if not os.path.exists(probe(p))]
      if not unseen or time.monotonic() > deadline:
        break
      time.sleep(0.5)
    # Decided together: a process that saw every probe while another did not must stop too
    # (alone it would wait at the run's next collective for a process that has left).
    blind = np.asarray(multihost_utils.process_allgather(np.int32(len(unseen)))).reshape(-1)
  finally:
    os.remove(probe(me))
  if blind.any():
    sees = (f"does not see there the files process(es) {', '.join(map(str, unseen))} made"
            if unseen else "sees every probe, but process(es) "
            f"{', '.join(str(p) for p in np.flatnonzero(blind))} do not see all of them")
    raise UnsharedDirectoryError(
        f"{flag} {directory} must be on a file system every host sees: process {me} {sees} "
        "(a local disk on each host holds only that host's share of checkpoints and rows)")


def local_rows(global_batch: int) -> slice:
  """This process's contiguous share of a global batch of rows (the batch axis of the mesh is
  laid out process by process, so contiguous shares match device placement)."""
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f"batch size {global_batch} does not split over {count} processes")
  per = global_batch // count
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(local, shardings):
  """Assembles host-local arrays (this process's rows, `local_rows`) into global jax.Arrays."""
  def one(x, sharding):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    if jax.process_count() > 1:
      check_process_rows(sharding.addressable_devices_indices_map(shape).values(), shape[0])
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(one, local, shardings)


def check_process_rows(indices, rows: int, process: int | None = None,
                       processes: int | None = None) -> None:
  """Refuses a mesh on which this process's devices do not hold exactly its `local_rows` of a
  global batch.  Each process builds its contiguous block of rows, and RL pairs its rollouts
  with its own rows by that block; a hybrid mesh whose DCN factor is on an inner batch axis
  (`mesh.dcn` on fsdp while data > 1) interleaves processes' rows, which would silently pair
  one process's questions with another's rollouts.  indices: the addressable devices' index
  tuples (`Sharding.addressable_devices_indices_map(shape).values()`)."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  per = rows // processes
  held = set()
  for index in indices:
    held.update(range(*index[0].indices(rows)))
  if held != set(range(process * per, (process + 1) * per)):
    blocks = sorted(held)
    raise MeshError(
        f"process {process}'s devices hold {len(blocks)} rows of a global batch of {rows} "
        f"(from row {blocks[0] if blocks else '-'} to {blocks[-1] if blocks else '-'}, not "
        f"rows {process * per}-{(process + 1) * per - 1}, the contiguous block it builds): "
        "put the mesh's DCN factor (mesh.dcn) on `data`, the outermost batch axis, and none "
        "on `tensor`")


def all_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows of a host array (this process's: `local`), in process order: what
  one process would hold for the whole batch (for metrics of rows only their own process can
  compute, such as rewards)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def to_host(tree):
  """Every leaf as a full numpy array on every process (allgathers sharded global arrays)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
