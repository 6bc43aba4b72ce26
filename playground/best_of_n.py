"""Best-of-n in the chat: sample n replies per slot from the live version, keep the one the reward model
scores highest.

No training: the cheapest way to optimise a proxy, and the first curve of Gao et al. (2022): the kept
reply's KL to the policy is log n - (n - 1)/n. `--best-of-n N` (and the admin panel) turns it on; the
reward model is the one named (`configure(n, "r2")`), else the latest whose held-out accuracy clears
chance. With no such reward model, or one that fails to load, the chat serves plain pairs and says why. The reward model is loaded in the app's
process on first use (a copy of the base weights with its LoRA and score head) and again only when the
reward model to use changes.

A pair's 2n candidates decode as one request in the shared decode loop (rows a, b, a, b, ...), each row
with its own seed, so the kept reply's stored seed still reproduces it on its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from playground.serving.generation import SLOTS
from playground.serving.policy import PolicyHolder
from store import Store, StoreError

log = logging.getLogger(__name__)

# Candidates per slot at most: 2n rows must fit in one batch of the decode loop (16 rows by default).
MAX_BEST_OF_N = 8


class BestOfNUnavailable(RuntimeError):
    """Best-of-n cannot rank now; the message says why (no usable reward model, or it failed to load)."""


def best_per_slot(slots: Sequence[str], scores: Sequence[float]) -> list[int]:
    """The index of the highest-scored row of each slot, in SLOTS order (the first on a tie)."""
    best: dict[str, int] = {}
    for i, (slot, score) in enumerate(zip(slots, scores, strict=True)):
        if slot not in best or score > scores[best[slot]]:
            best[slot] = i
    missing = [s for s in SLOTS if s not in best]
    if missing:
        raise ValueError(f"no candidate for slot(s) {missing}")
    return [best[s] for s in SLOTS]


class BestOfN:
    def __init__(self, store: Store, policy: PolicyHolder, n: int = 1, reward_model: str | None = None):
        self.store = store
        self.policy = policy
        self._lock = threading.Lock()  # one load at a time; guards the settings and the cache
        self.n = 1
        self.reward_model = None  # a name the admin chose, else None for the latest usable one
        self._loaded: tuple[str, object] | None = None  # (name, RewardScorer)
        self._refused: dict[str, str] = {}  # reward models that failed to load, with why
        self.configure(n, reward_model)

    def configure(self, n: int, reward_model: str | None = None) -> str:
        """Set n (1 turns it off) and the reward model (None: the latest usable). Raises ValueError."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BEST_OF_N:
            raise ValueError(f"best-of-n must be a whole number from 1 (off) to {MAX_BEST_OF_N}, got {n!r}")
        if reward_model and self.store.reward_model(self.policy.model_id, reward_model) is None:
            raise ValueError(f"there is no reward model {reward_model}")
        with self._lock:
            self.n, self.reward_model = n, reward_model or None
            if n == 1:
                self._loaded = None  # its copy of the weights is not kept while best-of-n is off
        if n == 1:
            return "Best-of-n is off: each reply is one sample."
        return f"Each reply is the best of {n} samples by {reward_model or 'the latest usable reward model'}."

    @property
    def active(self) -> bool:
        return self.n > 1

    def _row(self) -> dict:
        if self.reward_model:
            row = self.store.reward_model(self.policy.model_id, self.reward_model)
            if row is None:
                raise BestOfNUnavailable(f"reward model {self.reward_model} is gone")
            return row
        row = self.store.latest_reward_model(self.policy.model_id, usable_only=True)
        if row is None:
            raise BestOfNUnavailable("there is no reward model whose held-out accuracy clears chance yet")
        return row

    def scorer(self):
        """The reward model to rank with, loaded once per name (a refusal is remembered too, so a broken
        folder is not re-read on every turn). Raises BestOfNUnavailable."""
        from trainers.reward import load_reward_model

        with self._lock:
            try:
                row = self._row()
            except StoreError as exc:
                raise BestOfNUnavailable(f"the reward models could not be read ({exc})") from exc
            name = row["name"]
            if name in self._refused:
                raise BestOfNUnavailable(self._refused[name])
            if self._loaded is None or self._loaded[0] != name:
                try:
                    scorer = load_reward_model(self.policy.base.model, Path(row["folder"]), self.policy.model_id)
                except Exception as exc:  # AdapterError, or anything else a damaged folder or a full memory raises
                    self._refused[name] = f"reward model {name} was refused ({exc})"
                    log.warning("best-of-n: %s", self._refused[name])
                    raise BestOfNUnavailable(self._refused[name]) from exc
                self._loaded = (name, scorer)
                log.info("best-of-n ranks with reward model %s", name)
            return self._loaded[1]

    def rank(self, scorer, tokenizer, context: list[dict], replies: Sequence) -> tuple[list[int], list[float]]:
        """(the kept row of each slot, every candidate's score): replies are the request's rows, slots
        alternating; scored as the reward model was trained, on the reply rendered after its context."""
        scores = scorer.score_texts(tokenizer, context, [r.text for r in replies])
        return best_per_slot([r.slot for r in replies], scores), [float(s) for s in scores]

    def status(self) -> dict:
        row = None
        try:
            row = self._row()
        except BestOfNUnavailable as exc:
            return {"n": self.n, "reward_model": None, "reason": str(exc)}
        return {"n": self.n, "reward_model": row["name"], "reason": None}
