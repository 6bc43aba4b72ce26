"""What every kind of round shares: its record in the store, its base model, and how it ends.

`trainers/run.py` runs a DPO round, `trainers/reward_round.py` a reward-model round and
`trainers/ppo_round.py` a PPO round; each opens a `Round`, and ends it with `finish` (or by raising
`RoundStopped`, which `Round.stopped` turns into a recorded skip or failure with its reason).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("trainers.run")


class RoundStopped(Exception):
    """A round that ends before publishing anything: status 'skipped' (not enough to learn from) or
    'failed' (training went wrong), with the reason recorded on the round."""

    def __init__(self, status: str, reason: str, **extra):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.extra = extra


@dataclass
class Round:
    store: object
    loaded: object  # playground.serving.models.LoadedModel
    run_id: int
    parent: str
    started: float = field(default_factory=time.perf_counter)

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def finish(self, status: str, reason: str | None = None, **extra) -> tuple[int, dict]:
        self.store.finish_run(self.run_id, status, reason=reason, **extra)
        summary = {"run_id": self.run_id, "status": status, "reason": reason, "parent": self.parent,
                   "seconds": round(time.perf_counter() - self.started, 2), **extra}
        return (1 if status == "failed" else 0), summary

    def stopped(self, exc: RoundStopped) -> tuple[int, dict]:
        return self.finish(exc.status, exc.reason, **exc.extra)

    def progress(self, prefix: str = "", bar=None):
        """An on_step callback: the round's progress and curves in the store (names prefixed, so a PPO
        round's reward-model phase and its PPO phase keep apart curves), and the progress bar."""

        def on_step(m: dict) -> None:
            self.store.update_run_progress(
                self.run_id, m["step"], m["total_steps"], m.get("loss"),
                {f"{prefix}{k}": v for k, v in m.items() if k not in ("step", "total_steps")
                 and isinstance(v, (int, float)) and not isinstance(v, bool)})
            if bar is not None:
                bar(m)

        return on_step


def open_round(args, algo: str, config: dict) -> Round:
    """Load the base model and record the round (or take the one the scheduler recorded)."""
    from playground.serving.models import load_model
    from store import Store

    store = Store(args.db)
    loaded = load_model(args.model, args.device, args.model_cache)
    store.ensure_base_version(loaded.model_id)
    parent = store.live_version(loaded.model_id) or "v0"
    run_id = args.run_id or store.create_run(algo, config, loaded.model_id, parent, args.trigger)
    return Round(store, loaded, run_id, parent)
