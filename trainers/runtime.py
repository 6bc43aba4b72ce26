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


@torch.no_grad()
def round_adapter_to_bf16(model) -> int:
    """Round every LoRA A and B of a PEFT model to the nearest bfloat16 value, in place (the tensors keep
    their dtype). A round's adapter is rounded once, after its last step and before anything scores it:
    the serving engine then keeps it as bfloat16 exactly (half the memory of float32, for every version
    resident), and the round's own evaluation, the store's log-probs and the engine all see the same
    adapter. The rounding moves each value by at most 2^-9 of itself. Returns the number of values rounded."""
    count = 0
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.copy_(param.to(torch.bfloat16).to(param.dtype))
            count += param.numel()
    return count
