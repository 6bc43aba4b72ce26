"""The one log-probability helper for the tokens of a reply: the DPO trainer scores with it, and trainers
to come (a reward model's data path, PPO) are to use it rather than a copy. The exact KL in
`trainers.metrics` compares whole next-token distributions, so it reads full logits instead.

`token_logprobs` returns log p(token_t | tokens_<t) for the positions a mask selects. Only the hidden
states that predict a selected token go through the LM head (`logits_to_keep` as a boolean mask), and
the log-softmax runs only over those rows: replies are a small part of a chat-length sequence and the
vocabulary is large, so the full [batch, seq, vocab] logits would be most of the memory and a good part
of the time a naive version spends.

`position_ids` and a 4D `attention_mask` pass through to the model, so a caller can score packed rows
(e.g. DPO's prompt + chosen + rejected in one row, the rejected reply masked off the chosen one).

For a model whose logits are a plain linear head over the decoder's last hidden state (Llama, Qwen,
SmolLM, most causal LMs; not Gemma's soft-capped logits), the head and the log-softmax run fused, a
chunk of rows at a time (`_HeadLogprobs`): the [rows, vocab] logits are never materialised whole, the
chunk is still in cache for the log-sum-exp, and the backward recomputes each chunk instead of keeping
a [rows, vocab] softmax alive. For a DPO round on SmolLM2 the unfused version spent a quarter of its
time in those big temporaries (allocation, page faults and separate passes for sub/exp/mul).
"""

from __future__ import annotations

import torch

# Logit rows computed at a time by the fused head: 128 x a 49k vocabulary is 25 MB in float32, which
# stays in cache between the product and the log-sum-exp, keeps the product efficient (measured on this
# project's CPU: 128-row chunks 5-14% slower than one big product, in runs that drifted by more than
# that) and stays under glibc's largest mmap
# threshold (32 MB), so the allocation is reused from call to call instead of page-faulted in anew.
HEAD_CHUNK_ROWS = 128


class _HeadLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[i, targets[i]] for every row i, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, HEAD_CHUNK_ROWS):
            rows = slice(start, start + HEAD_CHUNK_ROWS)
            logits = _chunk_logits(hidden[rows], weight, bias)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, targets[rows, None])[:, 0] - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        grad = grad.float()
        for start in range(0, hidden.shape[0], HEAD_CHUNK_ROWS):
            rows = slice(start, start + HEAD_CHUNK_ROWS)
            # d/dlogits of (logit[target] - logsumexp) is onehot(target) - softmax; scaled by the incoming grad.
            g = _chunk_logits(hidden[rows], weight, bias)
            g.sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])
            g.scatter_add_(1, targets[rows, None], grad[rows, None])
            if need_hidden:
                grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(g.t(), hidden[rows].float())
            if need_bias:
                grad_bias += g.sum(0)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits += bias
    return logits.float()


def _plain_head(model):
    """(decoder, head) when the model's logits are exactly head(decoder(...).last_hidden_state); else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_decoder, get_head = getattr(base, "get_decoder", None), getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    # Exactly nn.Linear: a LoRA-wrapped or quantised head goes through the model's own forward.
    if decoder is None or decoder is base or type(head) is not torch.nn.Linear:
        return None
    if base.__class__.__name__.endswith("ForCausalLM") and getattr(base, "lm_head", None) is head:
        return decoder, head
    return None


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
    targets = input_ids[:, 1:][target_mask[:, 1:]]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(predicted)[predicted]
    plain = _plain_head(model)
    if plain is not None:
        decoder, head = plain
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        return _HeadLogprobs.apply(hidden[predicted], head.weight, head.bias, targets), rows
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=predicted, use_cache=False,
    )
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep still gets the right rows
        logits = logits[predicted]
    logits = logits.float()  # [N, V], row-major over the predicting positions
    picked = logits.gather(-1, targets[:, None])[:, 0]
    return picked - torch.logsumexp(logits, dim=-1), rows


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
