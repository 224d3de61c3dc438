"""The multi-process flags shared by the launchers (`--distributed` and the coordinator)."""

from absl import flags

DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed (auto-detects Cloud TPU and SLURM).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize() -> None:
  """jax.distributed from the flags (a no-op for a single process)."""
  from memrecall.runtime import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(DISTRIBUTED.value, COORDINATOR.value, NUM_PROCESSES.value,
                         PROCESS_ID.value)
