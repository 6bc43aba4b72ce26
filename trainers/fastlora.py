"""A faster forward for PEFT's LoRA linear layers while a trainer runs, optionally with bf16 matmuls.

    with fast_lora(policy, compute_dtype=torch.bfloat16):
        ...  # reference pass, training steps, held-out scoring

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling`: the scale and the sum are two more passes over
the layer's whole output, forward and backward, and on a CPU those memory-bound passes cost as much as
a third of the layer's matrix product (profile of a DPO round, trainers/dpo.py). Here the LoRA path is
added into the base output in place by one `addmm` with the scale as its alpha: the same numbers, fewer
passes.

With `compute_dtype=torch.bfloat16` the frozen base weight is also kept as a bf16 copy and the base
product runs in bf16 with float32 accumulation; on a CPU with AVX512-BF16 that product is 2-3x faster
(`bench/dpo_vs_trl.py` prints the round time each way). Only the frozen product is rounded: activations,
the residual stream, the LoRA path, the LoRA gradients and the optimizer stay float32, and the
reference pass (adapter disabled) goes through the same bf16 product as the policy. That alone is not
enough for an exact first step: bf16 rounding amplifies the tiny float32 differences between matrix
shapes, so a reference scored in other batches than the training step's gave a step-1 DPO loss of
0.692779, not ln 2, on 32 bundled-model pairs. trainers/dpo.py therefore scores the reference on the
first epoch's own batches, and step 1 is exactly ln 2 (bench/dpo_vs_trl.py: 0.6931472).

Only plain LoRA layers are patched (an nn.Linear base, no DoRA or other variant, no dropout, one active
adapter, not merged); any other layer, or a call with extra arguments, runs PEFT's own forward.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """bf16 products beat float32 ones here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 (or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def _eligible(module) -> bool:
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or type(module.base_layer) is not torch.nn.Linear:
        return False
    if getattr(module, "fan_in_fan_out", False) or module.lora_variant:
        return False
    dropouts = [module.lora_dropout[name] for name in module.lora_dropout]
    return all(isinstance(d, torch.nn.Identity) or (isinstance(d, torch.nn.Dropout) and d.p == 0) for d in dropouts)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    if args or kwargs or self.merged or len(active) > 1:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    weight = self._fast_weight
    x2 = x.reshape(-1, x.shape[-1])
    out = F.linear(x2.to(weight.dtype), weight).to(x.dtype)
    if base.bias is not None:
        out += base.bias
    if not self.disable_adapters and active:
        name = active[0]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.dtype == out.dtype:
            out = out.addmm_(x2 @ a.t(), b.t(), alpha=self.scaling[name])
        else:
            # bf16/fp16 base weights (a GPU's default) with float32 LoRA weights (PEFT upcasts adapters):
            # the LoRA path in the adapter's dtype, added in the output's, as PEFT's own forward does.
            out = out + ((x2.to(a.dtype) @ a.t()) @ b.t() * self.scaling[name]).to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextmanager
def fast_lora(model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> Iterator[int]:
    """Patch the model's plain LoRA layers for the duration; yields how many were patched.

    compute_dtype: the dtype of the frozen base products (None: the weights' own dtype).
    """
    patched = []  # (module, the instance forward it had before, if any)
    for module in model.modules():
        if not _eligible(module):
            continue
        weight = module.base_layer.weight.detach()
        module._fast_weight = weight if compute_dtype in (None, weight.dtype) else weight.to(compute_dtype)
        patched.append((module, vars(module).get("forward")))
        module.forward = types.MethodType(_forward, module)
    try:
        yield len(patched)
    finally:
        for module, previous in patched:
            del module.forward  # the instance attribute: the class's forward shows through again
            if previous is not None:
                module.forward = previous
            del module._fast_weight
