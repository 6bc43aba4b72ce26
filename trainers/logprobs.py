"""The one log-probability helper: DPO, the reward model's data path, PPO and the KL metrics all use it.

`token_logprobs` returns log p(token_t | tokens_<t) for the positions a mask selects. Only the hidden
states that predict a selected token go through the LM head (`logits_to_keep` as a boolean mask), and
the log-softmax runs only over those rows: replies are a small part of a chat-length sequence and the
vocabulary is large, so the full [batch, seq, vocab] logits would be most of the memory and a good part
of the time a naive version spends.

`position_ids` and a 4D `attention_mask` pass through to the model, so a caller can score packed rows
(e.g. DPO's prompt + chosen + rejected in one row, the rejected reply masked off the chosen one).
"""

from __future__ import annotations

import torch


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `input_ids` where `target_mask` is True.

    input_ids, target_mask: [batch, seq]; attention_mask: [batch, seq] or a ready 4D mask
    [batch, 1, seq, seq]; position_ids: [batch, seq] or None. target_mask[b, t] marks token t as scored
    (t >= 1: the first token has no prediction). Returns (logprobs [n_selected], row index [n_selected]),
    in row-major order of the selected positions.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    target_mask = target_mask.bool()
    predicted = torch.zeros_like(target_mask)
    predicted[:, :-1] = target_mask[:, 1:]  # position t-1 predicts token t
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=predicted, use_cache=False,
    )
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep still gets the right rows
        logits = logits[predicted]
    logits = logits.float()  # [N, V], row-major over the predicting positions
    targets = input_ids[:, 1:][target_mask[:, 1:]]
    picked = logits.gather(-1, targets[:, None])[:, 0]
    logprobs = picked - torch.logsumexp(logits, dim=-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predicted)[predicted]
    return logprobs, rows


def segment_logprobs(
    model,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    n_segments: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the selected tokens' log-probs per segment: [n_segments].

    segment_ids[b, t] in [0, n_segments) names the sum token t adds to, so one row can hold several
    scored sequences (a chosen and a rejected reply after a shared prompt).
    """
    logprobs, _ = token_logprobs(model, input_ids, target_mask, attention_mask, position_ids)
    segments = segment_ids[:, 1:][target_mask[:, 1:].bool()]  # the same row-major order as the log-probs
    sums = torch.zeros(n_segments, dtype=logprobs.dtype, device=logprobs.device)
    return sums.index_add(0, segments, logprobs)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the selected tokens' log-probs per row: [batch]."""
    logprobs, rows = token_logprobs(model, input_ids, target_mask, attention_mask, position_ids)
    sums = torch.zeros(input_ids.shape[0], dtype=logprobs.dtype, device=logprobs.device)
    return sums.index_add(0, rows, logprobs)


def reply_mask(prompt_len: int, total_len: int, device=None) -> torch.Tensor:
    """[1, total_len] mask selecting the reply tokens after a prompt of prompt_len tokens."""
    mask = torch.zeros(1, total_len, dtype=torch.bool, device=device)
    mask[:, prompt_len:] = True
    return mask
