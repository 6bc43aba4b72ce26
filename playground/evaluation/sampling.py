"""Sampling a version's probe replies: many rows through the decode engine at once, each with its seed.

The chat's decode loop serves people; an evaluation decodes on its own thread, straight on the engine
(which lets threads decode their own states at once), so it never waits in, or holds, the chat's queue.
Each probe's prompt is prefilled once and its cache copied to one single-row state per sample, so a
finished reply leaves the batch at once and the next probe's rows take its place: up to `batch_rows`
rows share each `Engine.decode_many` step, which reads the weights once for all of them.

Every row samples with its own seeded `torch.Generator` through `generation.sample_rows`, the chat's
sampler (a row's token depends on its own generator only, so a seed gives the same reply whatever rows
share the step). The logits each token was drawn from are kept with the reply: they are this version's
distributions along it, which the KL needs, so the version itself is never scored again.

Models the engine does not support (and prompts past its window) are sampled by `generation.sample_pair`
through the HF forward, two seeds at a time; their replies come without logits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from playground.evaluation.targets import Target
from playground.serving.generation import SampledReply, SamplingSettings, sample_pair, sample_rows


@dataclass
class Job:
    """One probe's prompt and the seed of each of its samples."""

    probe_idx: int
    prompt_ids: list[int]
    seeds: list[int]


@dataclass
class ProbeReply:
    probe_idx: int
    sample: int
    reply: SampledReply
    # [n_tokens, V] float32: the distribution each token was drawn from (temperature 1, before any
    # filter); None from the HF path.
    logits: torch.Tensor | None = None


@dataclass
class _Row:
    job: Job
    sample: int
    reply: SampledReply
    generator: torch.Generator
    state: object
    # [max_new, V] float32: row t holds the logits token t is drawn from, written as each step returns
    # (one copy per token, no list of rows to concatenate at the end); `logits` views the next one.
    history: torch.Tensor
    logits: torch.Tensor  # [1, V]: the distribution of the next token

    def keep(self, logits: torch.Tensor) -> None:
        n = self.reply.n_tokens
        self.history[n].copy_(logits)
        self.logits = self.history[n:n + 1]


def sample_probes(target: Target, jobs: list[Job], settings: SamplingSettings, stop_ids: set[int], batch_rows: int,
                  on_reply: Callable[[ProbeReply], None], check: Callable[[], None] = lambda: None) -> None:
    """Sample every job's replies with `target`, calling `on_reply` as each reply finishes (in no fixed
    order; each reply is the same whatever the order). `check` runs before every step (it may raise to
    stop)."""
    max_new = int(settings.max_new_tokens)
    engine_jobs = [j for j in jobs if target.fits_engine(len(j.prompt_ids) + max_new)]
    for job in jobs:
        if not target.fits_engine(len(job.prompt_ids) + max_new):
            check()
            _sample_hf(target, job, settings, stop_ids, on_reply)
    if engine_jobs:
        _sample_engine(target, engine_jobs, settings, stop_ids, batch_rows, on_reply, check)


@torch.inference_mode()
def _sample_engine(target: Target, jobs: list[Job], settings: SamplingSettings, stop_ids: set[int],
                   batch_rows: int, on_reply: Callable[[ProbeReply], None], check: Callable[[], None]) -> None:
    engine, adapter = target.engine, target.adapter
    max_new = int(settings.max_new_tokens)
    pending = deque(jobs)
    active: list[_Row] = []
    started = time.perf_counter()
    while pending or active:
        check()
        # Whole probes join while their rows fit (one always does, however many samples it has).
        while pending and (not active or len(active) + len(pending[0].seeds) <= batch_rows):
            active += _start_rows(engine, adapter, pending.popleft(), max_new)
        tokens, picked = sample_rows(torch.cat([r.logits for r in active]), settings, [r.generator for r in active])
        feed = []
        for i, row in enumerate(active):
            last = row.reply.n_tokens + 1 == max_new
            row.reply.add(int(tokens[i]), picked[i], time.perf_counter() - started, stop_ids, last=last)
            if row.reply.done:
                on_reply(_finished(row, target.tokenizer))
            else:
                feed.append(i)
        active = [active[i] for i in feed]
        if active:
            logits = engine.decode_many([r.state for r in active], tokens[feed], adapters=[adapter] * len(active))
            for i, row in enumerate(active):
                row.keep(logits[i])


def _start_rows(engine, adapter: str | None, job: Job, max_new: int) -> list[_Row]:
    """Prefill the probe once; each sample gets its own single-row copy of the prompt's cache."""
    n = len(job.prompt_ids)
    first, logits = engine.prefill(job.prompt_ids, 1, n + max_new, adapter=adapter)
    rows = []
    for sample, seed in enumerate(job.seeds):
        state = first
        if sample:
            state = engine.new_state(1, n + max_new)
            state.keys[:, :, :, :n] = first.keys[:, :, :, :n]
            state.values[:, :, :, :n] = first.values[:, :, :, :n]
            state.length, state.adapter = n, adapter
        generator = torch.Generator(device=engine.device).manual_seed(int(seed))
        history = torch.empty(max_new, logits.shape[-1], dtype=torch.float32, device=logits.device)
        row = _Row(job, sample, SampledReply(slot=str(sample), seed=int(seed)), generator, state, history, logits)
        row.keep(logits[0])
        rows.append(row)
    return rows


def _finished(row: _Row, tokenizer) -> ProbeReply:
    row.reply.text = tokenizer.decode(row.reply.text_ids, skip_special_tokens=True)
    reply = ProbeReply(row.job.probe_idx, row.sample, row.reply, row.history[:row.reply.n_tokens])
    row.history = row.logits = row.state = None
    return reply


def _sample_hf(target: Target, job: Job, settings: SamplingSettings, stop_ids: set[int],
               on_reply: Callable[[ProbeReply], None]) -> None:
    if target.adapter is not None:
        raise ValueError(f"{target.version} can only be decoded by the engine, and probe {job.probe_idx} "
                         "does not fit it")
    model, tokenizer = target.snapshot.model, target.tokenizer
    for first in range(0, len(job.seeds), 2):
        seeds = job.seeds[first:first + 2]
        pair = (seeds[0], seeds[1] if len(seeds) == 2 else seeds[0] + 1)  # an odd last sample: one row is spare
        replies = None
        for replies in sample_pair(model, tokenizer, job.prompt_ids, settings, pair, stop_ids=stop_ids,
                                   use_engine=False):
            pass
        for offset, reply in enumerate(replies[:len(seeds)]):
            reply.slot = str(first + offset)
            on_reply(ProbeReply(job.probe_idx, first + offset, reply))
