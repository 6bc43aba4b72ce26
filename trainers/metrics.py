"""What the loop does to the policy's distribution, as numbers: KL to v0, length, diversity, win rates.

Shared by the loop benchmark and (later) the dashboard, so both report the same quantities.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def kl_per_reply(policy, reference, input_ids: torch.Tensor, target_mask: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact KL(policy || reference) summed over each row's reply tokens: [batch], in nats.

    At every reply position the full next-token distributions of both models are compared (not a
    one-sample estimate), given the same prefix; the sum over the reply is the sequence-level KL of
    the policy's reply to the reference's along that sampled path.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    predicted = target_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predicted)[predicted]
    logp = torch.log_softmax(policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][predicted]
                             .float(), dim=-1)
    logq = torch.log_softmax(reference(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][predicted]
                             .float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return torch.zeros(input_ids.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, per_token)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams across the texts (1.0: no repetition; falls with mode collapse)."""
    grams, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def win_rate(scores_new: list[float], scores_old: list[float]) -> tuple[float, tuple[float, float]]:
    """Share of paired comparisons the new policy wins (ties count half), with a 95% Wilson interval."""
    if len(scores_new) != len(scores_old) or not scores_new:
        raise ValueError("win_rate needs two equally long, non-empty lists of scores")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_new, scores_old))
    n = len(scores_new)
    p = wins / n
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, (max(0.0, centre - half), min(1.0, centre + half))
