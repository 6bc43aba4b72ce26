"""The background evaluation of each version: the probe set sampled, scored and stored, off the chat's path.

When a version goes live (promote, rollback, the restore at start) the loop tells `Evaluator.schedule`;
one worker thread, niced below the chat, takes the queue in order. At start v0 (the baseline every drift
is measured against) and the live version are queued if this probe set has no succeeded evaluation of
them. A version evaluated successfully on this probe set with these settings is not evaluated again.

For a version, every probe gets `samples_per_prompt` replies at temperature 1 with no top-p (the numbers
describe the policy, not the sampler), each from a fixed seed per (probe, sample), so an evaluation
is reproducible and every version answers from the same seeds. For each reply the store keeps:

- kl_v0 and kl_prev: the exact KL of this version to v0 and to its parent at every position of the
  reply, summed (`playground.metrics.kl.sequence_kl` over both versions' logits on the same tokens:
  this version's are the ones the tokens were drawn from, kept from the sampling, the other's from
  `Engine.score_branches`; computed in float32 passes with float64 sums, scoring.py); for v0
  kl_v0 = 0 and kl_prev is null, and a parent that is v0 is scored once;
- logprob_sum (temperature 1, no top-p, the end-of-turn token included) and its 384-d sentence
  embedding (`serving.embeddings`, float32 bytes).

And for each held-out training pair, the version's implicit DPO reward margin against v0,
beta * [(log p_v(chosen) - log p_v0(chosen)) - (log p_v(rejected) - log p_v0(rejected))], with beta
from the round that made the version, recorded with the version that sampled the pair (none for v0,
whose margin is 0 by definition). The dashboard computes every statistic from these rows.

An attempt that crashes is recorded failed with its error and retried once (attempt 2); a second
failure stays failed. The chat never waits for any of it: the worker holds none of the chat's locks
(it decodes its own engine states) and, on Linux, runs at a lower priority (its own niceness, which
the threads it starts inherit).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from playground.evaluation.defaults import (
    DEFAULT_PROBES,
    DEFAULT_SAMPLES_PER_PROMPT,
    EVAL_BATCH_ROWS,
    EVAL_MAX_NEW_TOKENS,
    EVAL_NICENESS,
    MAX_HELD_OUT_PAIRS,
    MAX_SAMPLES_PER_PROMPT,
)
from playground.evaluation.probes import load_probes, probe_set_hash
from playground.evaluation.sampling import Job, ProbeReply, sample_probes
from playground.evaluation.scoring import OwnDistribution, Workspace
from playground.evaluation.targets import Target, resolve
from playground.serving.embeddings import load_embedder, model_folder
from playground.serving.generation import SamplingSettings, stop_token_ids
from playground.serving.limits import DEFAULT_MAX_CONTEXT_TOKENS
from playground.serving.policy import BASE_VERSION, PolicyHolder
from playground.serving.prompting import build_prompt
from store import Store
from trainers.data import BoundaryError, stored_specs, tokenize
from trainers.dpo import DPOConfig

log = logging.getLogger(__name__)

ATTEMPTS = 2  # a crashed evaluation is retried once
SHUTDOWN_WAIT_S = 10.0
INTERRUPTED = "interrupted: the app stopped while the evaluation was running"
RECENT_SHOWN = 5


class EvaluationCancelled(RuntimeError):
    """The evaluator was closed mid-way; the attempt is recorded failed and not retried."""


@dataclass(frozen=True)
class EvalSettings:
    """How each version is evaluated. Changing any field (or the probes) makes new evaluations."""

    probes_path: str = str(DEFAULT_PROBES)  # the probe file (playground/evaluation/probes.py has the format)
    samples_per_prompt: int = DEFAULT_SAMPLES_PER_PROMPT  # replies sampled per probe
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS  # each reply's length limit
    seed: int = 0  # the base of every sample's seed
    batch_rows: int = EVAL_BATCH_ROWS  # rows decoded together
    max_held_out_pairs: int = MAX_HELD_OUT_PAIRS  # held-out pairs scored at most
    niceness: int = EVAL_NICENESS  # added to the worker thread's niceness (Linux)

    def __post_init__(self):
        if not (isinstance(self.samples_per_prompt, int) and 1 <= self.samples_per_prompt <= MAX_SAMPLES_PER_PROMPT):
            raise ValueError(f"samples_per_prompt must be an integer in [1, {MAX_SAMPLES_PER_PROMPT}], "
                             f"got {self.samples_per_prompt!r}")
        SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=self.max_new_tokens)  # checks the limit
        if not (isinstance(self.batch_rows, int) and self.batch_rows >= 1):
            raise ValueError(f"batch_rows must be an integer >= 1, got {self.batch_rows!r}")
        if not (isinstance(self.max_held_out_pairs, int) and self.max_held_out_pairs >= 0):
            raise ValueError(f"max_held_out_pairs must be an integer >= 0, got {self.max_held_out_pairs!r}")

    @property
    def sampling(self) -> SamplingSettings:
        # Temperature 1, no top-p: the policy's own distribution.
        return SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=self.max_new_tokens)

    def record(self) -> dict:
        """What is stored with each evaluation (and must match for an earlier one to count)."""
        return {"samples_per_prompt": self.samples_per_prompt, "max_new_tokens": self.max_new_tokens,
                "temperature": 1.0, "top_p": 1.0, "seed": self.seed, "max_held_out_pairs": self.max_held_out_pairs,
                "embedder": "all-MiniLM-L6-v2"}


def sample_seed(base: int, probe_idx: int, sample: int) -> int:
    """The seed of one (probe, sample): the same for every version, so versions answer from the same draws."""
    return (base * 1_000_003 + probe_idx) * MAX_SAMPLES_PER_PROMPT + sample


class Evaluator:
    """The evaluation service: `schedule` (background, returns at once), `evaluate` (now, on this thread),
    `status` for the UI, `close`. `embedder`: an `Embedder` to use (tests share one); None loads the
    bundled one on the first evaluation. Raises ProbeFileError for a bad probe file and
    EmbedderUnavailable when the embedding model is not installed, before anything starts."""

    def __init__(self, store: Store, policy: PolicyHolder, settings: EvalSettings | None = None, embedder=None):
        self.store = store
        self.policy = policy
        self.settings = settings or EvalSettings()
        self.probes = load_probes(self.settings.probes_path)
        self.probe_set = probe_set_hash(self.probes)
        if embedder is None:
            model_folder()  # a missing wheel is said now, not at the first evaluation
        self._embedder = embedder
        self._cv = threading.Condition()
        self._queue: deque[str] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._current: dict | None = None  # the running evaluation: version, attempt, phase, done, total
        self._recent: deque[dict] = deque(maxlen=RECENT_SHOWN)
        self._prompts: list[list[int]] | None = None
        self._v0_cache: dict[tuple, list[float]] = {}  # v0's log-probs of the held-out pairs

    # -- the service ------------------------------------------------------------------------------

    def start(self) -> None:
        """Mark attempts a crash left running as failed, then queue v0 and the live version if needed."""
        for evaluation_id in self.store.fail_interrupted_evaluations(INTERRUPTED):
            log.info("evaluation %s was interrupted by a restart", evaluation_id)
        self.schedule(BASE_VERSION)
        self.schedule(self.policy.snapshot().version)

    def schedule(self, version: str) -> bool:
        """Queue an evaluation of `version` and return at once; False when it is queued or running
        already, or evaluated successfully on this probe set with these settings."""
        with self._cv:
            if self._closed or version in self._queue or (self._current or {}).get("version") == version:
                return False
        if self._evaluated(version):
            return False
        with self._cv:
            if self._closed or version in self._queue:
                return False
            self._queue.append(version)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="evaluator")
                self._thread.start()
            self._cv.notify_all()
        return True

    def evaluate(self, version: str) -> dict:
        """Evaluate `version` now, on this thread: one attempt, and a second if the first crashed.
        Returns the last attempt's `evaluations` row."""
        row = None
        for attempt in range(1, ATTEMPTS + 1):
            row, retry = self._attempt(version, attempt)
            if not retry:
                break
        with self._cv:
            self._recent.append({k: row.get(k) for k in ("version", "status", "attempt", "error", "finished_at")})
        return row

    def status(self) -> dict:
        """What runs (version, attempt, phase, progress), what waits, and the last few results."""
        with self._cv:
            return {"running": dict(self._current) if self._current else None, "queued": list(self._queue),
                    "probe_set": self.probe_set, "n_probes": len(self.probes), "recent": list(self._recent)}

    def close(self) -> None:
        """Stop the worker: the queue is dropped, a running attempt stops at its next step (recorded failed)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=SHUTDOWN_WAIT_S)

    def _evaluated(self, version: str) -> bool:
        row = self.store.latest_succeeded_evaluation(self.policy.model_id, version, self.probe_set)
        return row is not None and json.loads(row["settings_json"] or "{}") == self.settings.record()

    def _run(self) -> None:
        _lower_priority(self.settings.niceness)
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                version = self._queue.popleft()
            try:
                if not self._evaluated(version):  # a duplicate queued before the first one finished
                    self.evaluate(version)
            except Exception:  # the store itself failed (locked, full): logged, the worker goes on
                log.exception("the evaluation of %s could not be recorded", version)

    # -- one attempt ------------------------------------------------------------------------------

    def _attempt(self, version: str, attempt: int) -> tuple[dict, bool]:
        """(the attempt's row, whether to retry)."""
        model_id = self.policy.model_id
        row = self.store.version(model_id, version)
        parent = row["parent"] if row else None
        evaluation_id = self.store.start_evaluation(model_id, version, parent, self.probe_set, len(self.probes),
                                                    self.settings.samples_per_prompt, self.settings.record(),
                                                    attempt=attempt)
        total = len(self.probes) * self.settings.samples_per_prompt
        with self._cv:
            self._current = {"version": version, "attempt": attempt, "evaluation_id": evaluation_id,
                             "phase": "loading", "done": 0, "total": total}
        retry = False
        try:
            self._evaluate(evaluation_id, version, parent)
        except EvaluationCancelled:
            self.store.fail_evaluation(evaluation_id, INTERRUPTED)
        except Exception as exc:
            log.exception("evaluation of %s (attempt %d) failed", version, attempt)
            self.store.fail_evaluation(evaluation_id, f"{type(exc).__name__}: {exc}"[:2000])
            retry = True
        finally:
            with self._cv:
                self._current = None
        return self.store.evaluation(evaluation_id), retry

    def _evaluate(self, evaluation_id: int, version: str, parent: str | None) -> None:
        started = time.perf_counter()
        target = Target.of(resolve(self.policy, self.store, version))
        base = target if version == BASE_VERSION else Target.of(self.policy.base)
        if version == BASE_VERSION:
            previous = None
        elif parent in (None, BASE_VERSION):
            previous = base
        else:
            previous = Target.of(resolve(self.policy, self.store, parent))
        prompts = self._prompt_ids()
        jobs = [Job(i, prompt, [sample_seed(self.settings.seed, i, s) for s in range(self.settings.samples_per_prompt)])
                for i, prompt in enumerate(prompts)]
        stop_ids = stop_token_ids(target.tokenizer, target.snapshot.model)
        replies: list[tuple[ProbeReply, float, float | None]] = []
        waiting: dict[int, list[ProbeReply]] = {}  # a probe's finished samples, scored once all are in
        scoring_s = 0.0
        workspace = Workspace()  # the KLs' scratch buffer, reused by every reply

        def on_reply(reply: ProbeReply) -> None:
            nonlocal scoring_s
            group = waiting.setdefault(reply.probe_idx, [])
            group.append(reply)
            if len(group) < self.settings.samples_per_prompt:
                return
            del waiting[reply.probe_idx]
            scored = time.perf_counter()
            kls = self._kls(target, base, previous, prompts[reply.probe_idx], group, workspace)
            scoring_s += time.perf_counter() - scored
            for r, (kl_v0, kl_prev) in zip(group, kls):
                r.logits = None  # [T, V]: let it go now
                replies.append((r, kl_v0, kl_prev))
            self._progress(done=len(replies))

        self._progress(phase="sampling")
        sampling_started = time.perf_counter()
        sample_probes(target, jobs, self.settings.sampling, stop_ids, self.settings.batch_rows, on_reply,
                      check=self._check_open)
        sampling_s = time.perf_counter() - sampling_started - scoring_s
        replies.sort(key=lambda r: (r[0].probe_idx, r[0].sample))

        self._progress(phase="embedding")
        embedding_started = time.perf_counter()
        embedder_load_s = self._load_embedder()
        vectors = self._embedder.encode([r.reply.text for r, _, _ in replies])
        embedding_s = time.perf_counter() - embedding_started - embedder_load_s

        self._progress(phase="held-out pairs")
        pairs_started = time.perf_counter()
        pairs, pair_counts = self._pair_margins(version, target, base)
        pairs_s = time.perf_counter() - pairs_started

        samples = [{
            "probe_idx": r.probe_idx, "sample": r.sample, "text": r.reply.text, "n_tokens": r.reply.n_tokens,
            "finish_reason": r.reply.finish_reason, "token_ids": r.reply.token_ids,
            "logprob_sum": float(r.reply.logprob_sum), "kl_v0": kl_v0, "kl_prev": kl_prev,
            "embedding": vector.to(torch.float32).numpy().astype("<f4").tobytes(),
        } for (r, kl_v0, kl_prev), vector in zip(replies, vectors)]
        n_tokens = sum(r.reply.n_tokens for r, _, _ in replies)
        metrics = {
            "seconds": {"sampling": round(sampling_s, 3), "scoring": round(scoring_s, 3),
                        "embedding": round(embedding_s, 3), "embedder_load": round(embedder_load_s, 3),
                        "held_out_pairs": round(pairs_s, 3), "total": round(time.perf_counter() - started, 3)},
            "counts": {"probes": len(self.probes), "samples": len(samples), "tokens": n_tokens,
                       "stopped": sum(r.reply.finish_reason == "stop" for r, _, _ in replies), **pair_counts},
            "backend": target.engine.backend if target.engine is not None else "hf",
            "tokens_per_s": round(n_tokens / sampling_s, 1) if sampling_s > 0 else None,
        }
        self._check_open()
        with self.store.batch("the evaluation"):
            self.store.add_eval_samples(evaluation_id, samples)
            self.store.add_eval_pairs(evaluation_id, pairs)
            self.store.finish_evaluation(evaluation_id, metrics)

    @staticmethod
    def _kls(target: Target, base: Target, previous: Target | None, prompt: list[int],
             group: list[ProbeReply], workspace: Workspace) -> list[tuple[float, float | None]]:
        """(KL to v0, KL to the parent) of each of a probe's replies, summed over its tokens; (0, None) for v0.
        The version's own logits are those its tokens were drawn from (never scored again); the
        references score all the probe's replies in one forward each, and a parent that is v0 is not
        scored twice. The KLs are `playground.metrics.kl.sequence_kl`'s, computed as scoring.py does."""
        if previous is None:
            return [(0.0, None)] * len(group)
        tokens = [r.reply.token_ids for r in group]
        mine = [r.logits for r in group]
        if any(m is None for m in mine):  # the HF path keeps none
            mine = target.branch_logits(prompt, tokens)
        own = [OwnDistribution(m, workspace) for m in mine]
        kl_v0 = [p.kl_to(q) for p, q in zip(own, base.branch_logits(prompt, tokens))]
        if previous is base:
            return [(kl, kl) for kl in kl_v0]
        kl_prev = [p.kl_to(q) for p, q in zip(own, previous.branch_logits(prompt, tokens))]
        return list(zip(kl_v0, kl_prev))

    def _pair_margins(self, version: str, target: Target, base: Target) -> tuple[list[dict], dict]:
        """Each held-out pair's implicit reward margin of `version` against v0 (none for v0 itself)."""
        if version == BASE_VERSION:
            return [], {"held_out_pairs": 0}
        model_id = self.policy.model_id
        # Imported pairs were sampled by no version of ours: accuracy by sampling version leaves them out.
        rows = self.store.training_pairs(model_id, held_out=True, new=None, include_simulated=True,
                                         include_imported=False)
        n_held_out = len(rows)
        if len(rows) > self.settings.max_held_out_pairs:
            rows = sorted(random.Random(self.settings.seed).sample(rows, self.settings.max_held_out_pairs),
                          key=lambda r: r["id"])
        config = self.store.version_round_config(model_id, version)
        beta = float(config.get("beta", DPOConfig.beta))
        max_length = int(config.get("max_length", DPOConfig.max_length))
        pairs, skipped = [], 0
        for row, spec in zip(rows, stored_specs(rows)):
            self._check_open()
            try:
                pair = tokenize(target.tokenizer, spec)
            except BoundaryError:
                skipped += 1
                continue
            if pair.length > max_length:
                skipped += 1
                continue
            replies = [pair.chosen_ids, pair.rejected_ids]
            chosen, rejected = (p - q for p, q in zip(target.reply_logprobs(pair.prompt_ids, replies),
                                                      self._v0_logprobs(base, pair.prompt_ids, replies)))
            pairs.append({"training_pair_id": row["id"], "source_version": row["policy_version"],
                          "margin": beta * (chosen - rejected)})
        return pairs, {"held_out_pairs": n_held_out, "pairs_scored": len(pairs), "pairs_skipped": skipped,
                       "beta": beta}

    def _v0_logprobs(self, base: Target, prompt_ids, replies: list) -> list[float]:
        """v0's log-probs of a pair's replies, kept: v0 never changes, and each evaluation scores the pairs."""
        key = (tuple(prompt_ids), tuple(tuple(r) for r in replies))
        if key not in self._v0_cache:
            self._v0_cache[key] = base.reply_logprobs(prompt_ids, replies)
        return self._v0_cache[key]

    def _prompt_ids(self) -> list[list[int]]:
        """Each probe rendered with the chat template, as the chat renders a turn (no system prompt)."""
        if self._prompts is None:
            base = self.policy.base
            budget = min(DEFAULT_MAX_CONTEXT_TOKENS, base.context_window - self.settings.max_new_tokens)
            self._prompts = [build_prompt(base.tokenizer, "", messages[:-1], messages[-1]["content"], budget).ids
                             for messages in self.probes]
        return self._prompts

    def _load_embedder(self) -> float:
        if self._embedder is not None:
            return 0.0
        started = time.perf_counter()
        self._embedder = load_embedder()
        return time.perf_counter() - started

    def _progress(self, **fields) -> None:
        with self._cv:
            if self._current is not None:
                self._current.update(fields)

    def _check_open(self) -> None:
        if self._closed:
            raise EvaluationCancelled("the evaluator was closed")


def _lower_priority(niceness: int) -> None:
    """Raise this thread's niceness (Linux: per thread; the threads it starts later inherit it)."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except (OSError, AttributeError):
        log.info("could not lower the evaluator's priority", exc_info=True)
