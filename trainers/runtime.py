"""What every trainer (DPO, reward model, PPO) shares about where and how it runs: the LoRA targets, the
model's device and dtype, seeded randomness that leaves the caller's alone, and the dtype of the frozen
base products."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch

from trainers.fastlora import bf16_matmul_is_fast

MatmulDtype = Literal["auto", "float32", "bfloat16"]
MATMUL_DTYPES = ("auto", "float32", "bfloat16")
# Every linear projection of a Llama-style block: attention and MLP.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


@contextmanager
def seeded(seed: int, device: torch.device):
    """Seed LoRA init and dropout without disturbing the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def matmul_dtype(config, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the frozen base products for a round (`config.matmul_dtype`); None keeps the weights' own."""
    if config.matmul_dtype == "bfloat16":
        return torch.bfloat16
    if config.matmul_dtype == "auto" and dtype == torch.float32 and bf16_matmul_is_fast(device):
        return torch.bfloat16
    return None
