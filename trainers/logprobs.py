"""The one log-probability helper: DPO, the reward model's data path, PPO and the KL metrics all use it.

`token_logprobs` returns log p(token_t | tokens_<t) for the positions a mask selects, computing the
log-softmax only over those rows of the logits (replies are a small part of a chat-length sequence,
and the vocabulary is large, so this is most of the memory a naive version spends).
"""

from __future__ import annotations

import torch


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `input_ids` where `target_mask` is True.

    input_ids, target_mask, attention_mask: [batch, seq]. target_mask[b, t] marks token t as scored
    (t >= 1: the first token has no prediction). Returns (logprobs [n_selected], row index [n_selected]),
    in row-major order of the selected positions.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    predicted = target_mask[:, 1:].bool()  # position t-1 predicts token t
    logits = hidden[:, :-1][predicted].float()  # [N, V]
    targets = input_ids[:, 1:][predicted]
    picked = logits.gather(-1, targets[:, None])[:, 0]
    logprobs = picked - torch.logsumexp(logits, dim=-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predicted)[predicted]
    return logprobs, rows


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the selected tokens' log-probs per row: [batch]."""
    logprobs, rows = token_logprobs(model, input_ids, target_mask, attention_mask)
    sums = torch.zeros(input_ids.shape[0], dtype=logprobs.dtype, device=logprobs.device)
    return sums.index_add(0, rows, logprobs)


def reply_mask(prompt_len: int, total_len: int, device=None) -> torch.Tensor:
    """[1, total_len] mask selecting the reply tokens after a prompt of prompt_len tokens."""
    mask = torch.zeros(1, total_len, dtype=torch.bool, device=device)
    mask[:, prompt_len:] = True
    return mask
