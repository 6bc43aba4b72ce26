"""Sampling the two replies of a turn: one batched decode loop, streamed token by token.

Both replies come from the same policy with different seeds (on-policy pairs). The prompt is
prefilled once and its KV cache repeated for the two rows, then every step decodes both rows in one
forward pass: on a CPU a step is bound by reading the weights, so the second row is almost free.

Each row samples with its own `torch.Generator`, so a stored seed reproduces its reply exactly. For
every sampled token we also keep its log-probability under the policy's own distribution
(temperature 1, no top-p): `logprob_sum` is what the KL and staleness metrics need later.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from playground.limits import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
)

SLOTS = ("a", "b")


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8  # below ~0.5 the two replies of a pair are often identical
    top_p: float = 0.95
    max_new_tokens: int = 256

    def __post_init__(self):
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature {self.temperature} is outside [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} must be in [1, {MAX_NEW_TOKENS_LIMIT}]")


@dataclass
class SampledReply:
    slot: str
    seed: int
    token_ids: list[int] = field(default_factory=list)  # sampled tokens, the end-of-turn token included
    text: str = ""
    finish_reason: str | None = None  # 'stop' (end of turn), 'length' (max_new_tokens); None while running
    logprob_sum: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def stop_token_ids(tokenizer, model) -> set[int]:
    """Every id that ends an assistant turn: the generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return {int(i) for i in ids}


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tail of each row outside the smallest set whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the mass before it already reaches top_p; the top token always stays.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.inference_mode()
def sample_pair(
    model,
    tokenizer,
    prompt_ids: list[int],
    settings: SamplingSettings,
    seeds: tuple[int, int],
    stop_ids: set[int] | None = None,
) -> Iterator[list[SampledReply]]:
    """Yield the two replies after every decode step; the last yield has both finished."""
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids
    replies = [SampledReply(slot=s, seed=int(seed)) for s, seed in zip(SLOTS, seeds)]
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    started = time.perf_counter()

    # Prefill once, then share the prompt's cache between the two rows.
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(SLOTS))
    logits = out.logits[:, -1, :].float().expand(len(SLOTS), -1)

    for step in range(int(settings.max_new_tokens)):
        logprobs = torch.log_softmax(logits, dim=-1)
        probs = filter_top_p(logits / settings.temperature, settings.top_p).softmax(dim=-1)
        next_tokens = torch.stack(
            [torch.multinomial(probs[i], 1, generator=generators[i])[0] for i in range(len(SLOTS))]
        )
        picked = logprobs.gather(-1, next_tokens[:, None])[:, 0].tolist()
        elapsed = time.perf_counter() - started
        for i, reply in enumerate(replies):
            if reply.done:
                continue
            token = int(next_tokens[i])
            reply.token_ids.append(token)
            reply.logprob_sum += picked[i]
            if reply.ttft_s is None:
                reply.ttft_s = elapsed
            if token in stop_ids:
                reply.finish_reason = "stop"
            elif step + 1 == settings.max_new_tokens:
                reply.finish_reason = "length"
            if reply.done:
                reply.latency_s = elapsed
            content = reply.token_ids[:-1] if reply.finish_reason == "stop" else reply.token_ids
            reply.text = tokenizer.decode(content, skip_special_tokens=True)
        yield replies
        if all(r.done for r in replies):
            return
        # A finished row keeps decoding (its tokens are ignored): the batch shape stays fixed and a
        # row costs little next to reading the weights.
        out = model(input_ids=next_tokens[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
