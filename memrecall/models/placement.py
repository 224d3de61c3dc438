"""Where a model's inference copy goes on a mesh's devices: sharded as training shards it,
whole on every device, or split over a tensor axis of the same devices re-formed as
data x tensor (`sharding.inference_weights` decides).  Evaluation, answering and RL's rollout
place their copy with it."""

from __future__ import annotations

import dataclasses

from memrecall.models.qwen2 import abstract_params
from memrecall.runtime import sharding


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the inference copy goes: `weights` ("sharded", "tensor" or "replicated"), the
  `mesh` the loop runs on (for "tensor", the devices re-formed as data x tensor), a `line`
  saying which and why, and the bytes of the copy a device holds."""
  weights: str
  mesh: object
  line: str
  device_bytes: int = 0


def placement(params, model, mesh, weights: str = "auto", memory: int | None = None
              ) -> Placement:
  """The placement `weights` asks (`sharding.inference_weights`) for the inference copy
  `params` (arrays or abstract arrays in `model`'s layout) on `mesh`'s devices; memory: a
  device's bytes (None: as the device reports them)."""
  boxed = abstract_params(model)  # traced once; each candidate mesh only maps its names
  bytes_on = lambda m: sharding.device_bytes_of(params, sharding.param_shardings(boxed, m))
  memory = memory or sharding.device_memory(mesh.devices.flat[0])
  chosen, runs_on = sharding.inference_weights(weights, mesh, bytes_on, memory,
                                               model.num_kv_heads)
  share = (bytes_on(sharding.tensor_mesh(mesh, 1)) if chosen == "replicated"
           else bytes_on(runs_on))
  where = (f" as data {runs_on.shape['data']} x tensor {runs_on.shape['tensor']}"
           if chosen == "tensor" else "")
  why = (f"auto: device memory {'unknown' if memory is None else f'{memory / 2**30:.1f} GiB'}, "
         f"a device's share up to {sharding.REPLICATE_UP_TO:.0%} of it"
         if weights == "auto" else "as asked")
  return Placement(chosen, runs_on, f"weights {chosen} over {mesh.size} device(s){where}, "
                   f"{share / 2**30:.2f} GiB per device ({why})", share)
