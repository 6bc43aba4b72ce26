"""Exact KL divergence between two policies' next-token distributions, from their logits.

The drift dashboard and the benchmarks compare a trained version with its reference on the same
reply: both models score the same tokens, giving two [T, V] logit tensors.
"""

from __future__ import annotations

import torch


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each position, where p = softmax(logits_p) and q = softmax(logits_q).

    Takes two [T, V] tensors (any leading shape works, the last axis is the vocabulary) at
    temperature 1 and returns [T] in float64. It is the exact sum over the vocabulary, not the
    one-sample estimate log p(x) - log q(x) that trainers log, because the dashboard compares it
    across versions and the sampled estimate is too noisy (and can go negative) on short replies.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    if logits_p.dim() < 1:
        raise ValueError("logits need a vocabulary axis, got a scalar")
    # float64: bf16/fp16 logits lose the small differences a KL of a few nats per reply is made of.
    log_p = torch.log_softmax(logits_p.detach().to(torch.float64), dim=-1)
    log_q = torch.log_softmax(logits_q.detach().to(torch.float64), dim=-1)
    p = log_p.exp()
    # Tokens p gives no mass (masked to -inf) contribute 0, not 0 * (-inf - x) = nan.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    # Rounding can leave -1e-17 where the two distributions are equal; KL is never negative.
    return terms.sum(dim=-1).clamp_min(0.0)


def sequence_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """The KL of a whole reply: token_kl summed over positions (the chain rule for the sequence)."""
    return float(token_kl(logits_p, logits_q).sum())
