"""launch/plan.py's byte counts against counts derived by hand from the 7B shapes."""

import pytest

from configs import models
from memrecall import plan
from memrecall.config import ModelConfig

E, M, V, L, H, K, D = 3584, 18944, 152064, 28, 28, 4, 128


def _qwen7b():
  return ModelConfig.from_dict(models.model_config("qwen2.5-7b").to_dict()).replace(compressor=True)


def _by_hand(fsdp: int, tensor: int) -> int:
  """Per-device bf16 bytes: kernels split over fsdp (embed dim) and tensor (heads/mlp/vocab);
  biases split over tensor only (their heads axis); norms replicated."""
  kernels = (2 * V * E  # embedding + lm_head: vocab over tensor, embed over fsdp
             + L * (2 * E * H * D + 2 * E * K * D)  # q and o; k and v
             + L * 3 * E * M)  # gate, up, down
  beacon_kernels = L * (E * H * D + 2 * E * K * D)
  sharded = (kernels + beacon_kernels) // (fsdp * tensor)
  beacon_embedding = E // fsdp
  biases = 2 * L * (H * D + 2 * K * D) // tensor  # ordinary and beacon q/k/v biases
  norms = (2 * L + 1) * E
  return 2 * (sharded + beacon_embedding + biases + norms)


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (4, 2), (2, 4)])
def test_param_and_optimizer_bytes_match_hand_counts(fsdp, tensor):
  result = plan.plan(_qwen7b(), {"fsdp": fsdp, "tensor": tensor}, trainable="backbone")
  assert result.params == _by_hand(fsdp, tensor)
  assert result.optimizer == 2 * result.params  # AdamW's two moments, bf16 like the params
  assert result.devices == 8


def test_beacon_only_training_keeps_moments_small():
  result = plan.plan(_qwen7b(), {"fsdp": 8}, trainable="beacon")
  beacon = (L * (E * H * D + 2 * E * K * D)) // 8 + E // 8 + L * (H * D + 2 * K * D)
  assert result.optimizer == 2 * 2 * beacon


def test_bank_and_activation_estimates():
  config = _qwen7b()
  result = plan.plan(config, {"data": 2, "fsdp": 4}, batch=16, turn_tokens=2560, bank_chunks=64)
  # 64 chunks x 28 layers x k,v x 1024 slots x 4 heads x 128 x 2 bytes, chunks over 8 devices.
  assert result.memory_bank == 64 * L * 2 * 1024 * K * D * 2 // 8
  rows = 2
  expected = (L * rows * 2560 * E * 2 + rows * 2560 * (4 * E + 3 * M + 2 * (H + 2 * K) * D) * 2
              + rows * 2560 * V * 4)
  assert result.activations == expected
