"""Sampling the two replies of a turn: one batched decode loop, streamed token by token.

Both replies come from the same policy with different seeds (on-policy pairs). The prompt is
prefilled once and its KV cache repeated for the two rows, then every step decodes both rows in one
forward pass: on a CPU a step is bound by reading the weights, so the second row is almost free.

The forward passes go through `playground.serving.engine` (a lean decode loop with its own copy of the
weights, built once per model object and cached) when it supports the model, and through the HF
model otherwise; both give the same logits to ~1e-5, so a seed gives the same reply either way.

Each row samples with its own `torch.Generator`, so a stored seed reproduces its reply exactly. For
every sampled token we also keep its log-probability under the policy's own distribution
(temperature 1, no top-p): `logprob_sum` is what the KL and staleness metrics need later.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from playground.serving import engine as engine_mod

from playground.serving.limits import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
)

SLOTS = ("a", "b")


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8  # below ~0.5 the two replies of a pair are often identical
    top_p: float = 0.95
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

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

    @property
    def text_ids(self) -> list[int]:
        """The tokens its text decodes from: all but the end-of-turn token that ended it."""
        return self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids

    def add(self, token: int, logprob: float, elapsed_s: float, stop_ids: set[int], last: bool) -> None:
        """Append a sampled token (its log-prob at temperature 1, no top-p) and note why the reply ends,
        if it does: an end-of-turn token, or the last step allowed. The text is the caller's to update."""
        self.token_ids.append(token)
        self.logprob_sum += logprob
        if self.ttft_s is None:
            self.ttft_s = elapsed_s
        if token in stop_ids:
            self.finish_reason = "stop"
        elif last:
            self.finish_reason = "length"
        if self.done:
            self.latency_s = elapsed_s


def stop_token_ids(tokenizer, model) -> set[int]:
    """Every id that ends an assistant turn: the generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return {int(i) for i in ids}


TOP_P_CANDIDATES = 256  # tokens sorted per row at first; more only when they do not reach top_p


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tail of each row outside the smallest set whose probability reaches top_p.

    A full sort of a 50k vocabulary costs ~2 ms a row on a CPU; the kept set is almost always among
    the few hundred most likely tokens, so those are sorted first (`topk`) and the search widens only
    when their mass does not reach top_p. Same set as sorting everything.
    """
    if top_p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    vocab = logits.shape[-1]
    k = min(TOP_P_CANDIDATES, vocab)
    while True:
        top, order = probs.topk(k, dim=-1)  # sorted, most likely first
        before = top.cumsum(dim=-1) - top
        # A token is dropped when the mass before it already reaches top_p; the top token always stays.
        # Once the last candidate of every row is dropped, so is every token outside the candidates.
        if k == vocab or bool((before[..., -1] >= top_p).all()):
            break
        k = min(vocab, k * 8)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before < top_p)
    return logits.masked_fill(~keep, float("-inf"))


# One engine per model object, built on its first generation (never at import). The fingerprint
# catches a model whose weights were changed in place after its engine was built.
_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


def _fingerprint(model) -> tuple:
    """Where each weight lives, its version counter, and ~5 sampled values of each (~1 ms)."""
    with torch.no_grad():
        params = list(model.parameters())
        probes = torch.cat([p.detach().reshape(-1)[:: max(1, p.numel() // 4)] for p in params])
        return tuple((p.data_ptr(), p._version) for p in params), probes.float().cpu().numpy().tobytes()


def engine_for(model):
    """The decode engine for `model` (built and cached on first use), or None to use the HF forward."""
    device = next(model.parameters()).device
    if device.type not in engine_mod.SUPPORTED_DEVICES or not engine_mod.supports(model):
        return None
    fingerprint = _fingerprint(model)
    with _engines_lock:  # one build at a time; concurrent first requests wait for it
        cached = _engines.get(model)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        engine = engine_mod.Engine.from_model(model)
        _engines[model] = (fingerprint, engine)
        return engine


@torch.inference_mode()
def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse transform sampling: u ~ U[0, 1) from the row's own generator, and the
    token where the row's cumulative probability first exceeds u times the row's total.

    `torch.multinomial` draws one exponential per vocabulary entry from the generator, serially: ~1.7 ms
    a row on this CPU, 30 ms a step for eight people's pairs, as long as the decode step itself. One
    uniform per row and a float64 cumulative sum over all rows at once cost ~0.3 ms for 16 rows. A token
    of probability zero (outside top-p) is never drawn: its cumulative sum equals the one before it, and
    the search takes the first entry strictly above the target. Each row uses only its own generator,
    one number a step, so a seed gives the same reply whichever rows shared the step.
    """
    u = torch.stack([torch.rand((), generator=g, device=probs.device, dtype=torch.float64) for g in generators])
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    return tokens.clamp_(max=probs.shape[-1] - 1)


@torch.inference_mode()
def sample_rows(logits: torch.Tensor, settings: SamplingSettings,
                generators: list[torch.Generator]) -> tuple[torch.Tensor, list[float]]:
    """One token per row from logits [rows, vocab] at the settings' temperature and top-p, each row with
    its own generator; returns (tokens [rows], each token's log-probability at temperature 1, no top-p).
    Every decode path samples here, so a seed gives the same reply whichever path decoded it."""
    native = engine_mod.native_sampling_probs(logits, settings.temperature, settings.top_p)
    if native is not None:  # the same distributions, ~1 ms a step sooner on a CPU
        probs, lse = native
        next_tokens = _draw(probs, generators)
        return next_tokens, (logits.gather(-1, next_tokens[:, None])[:, 0] - lse).tolist()
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = filter_top_p(logits / settings.temperature, settings.top_p).softmax(dim=-1)
    next_tokens = _draw(probs, generators)
    return next_tokens, logprobs.gather(-1, next_tokens[:, None])[:, 0].tolist()


def row_slots(rows: int) -> list[str]:
    """The slot of each row of a request: a, b for a pair; a, b, a, b, ... for best-of-n's candidates
    (row i is candidate i // 2 of slot SLOTS[i % 2])."""
    return [SLOTS[i % len(SLOTS)] for i in range(rows)]


@torch.inference_mode()
def sample_pair(
    model,
    tokenizer,
    prompt_ids: list[int],
    settings: SamplingSettings,
    seeds: tuple[int, int],
    stop_ids: set[int] | None = None,
    use_engine: bool | None = None,
) -> Iterator[list[SampledReply]]:
    """Yield the two replies after every decode step; the last yield has both finished. More seeds than
    two give more rows (best-of-n's candidates), their slots alternating a, b, a, b (`row_slots`).

    use_engine: None uses the decode engine where it supports the model, False the HF forward.
    """
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids
    replies = [SampledReply(slot=s, seed=int(seed)) for s, seed in zip(row_slots(len(seeds)), seeds)]
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    started = time.perf_counter()
    rows = len(seeds)
    max_new = int(settings.max_new_tokens)

    engine = engine_for(model) if use_engine is not False else None
    if engine is not None and len(prompt_ids) + max_new > engine.max_positions:
        engine = None  # past the model's window: leave it to the HF forward
    if engine is not None:
        # The last sampled token is never fed back: prompt + max_new positions are enough.
        state, logits = engine.prefill(list(prompt_ids), rows, len(prompt_ids) + max_new)

        def forward(tokens: torch.Tensor) -> torch.Tensor:
            return engine.decode(state, tokens)
    else:
        # Prefill once, then share the prompt's cache between the two rows.
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(rows)
        logits = out.logits[:, -1, :].float().expand(rows, -1)

        def forward(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal cache
            out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            return out.logits[:, -1, :].float()

    for step in range(max_new):
        next_tokens, picked = sample_rows(logits, settings, generators)
        elapsed = time.perf_counter() - started
        for i, reply in enumerate(replies):
            if reply.done:
                continue
            reply.add(int(next_tokens[i]), picked[i], elapsed, stop_ids, last=step + 1 == max_new)
            reply.text = tokenizer.decode(reply.text_ids, skip_special_tokens=True)
        yield replies
        if all(r.done for r in replies):
            return
        # A finished row keeps decoding (its tokens are ignored): the batch shape stays fixed and a
        # row costs little next to reading the weights.
        logits = forward(next_tokens)
