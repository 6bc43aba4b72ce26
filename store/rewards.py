"""Queries of the classic path: reward models, the prompts PPO rolls out on, over-optimisation points.

A mixin of `Store`, like `store/training.py`.
"""

from __future__ import annotations

import json
import random
from typing import Any

from store.pairs import is_held_out


class RewardQueries:
    # -- reward models ----------------------------------------------------------------------------

    def next_reward_model_name(self, model_id: str) -> str:
        rows = self._rows("select name from reward_models where model_id = ?", [model_id])
        numbers = [int(r["name"][1:]) for r in rows if r["name"][1:].isdigit()]
        return f"r{max(numbers, default=0) + 1}"

    def record_reward_model(self, name: str, model_id: str, folder: str, run_id: int | None, manifest: dict,
                            max_feedback_id: int) -> None:
        """Record a published reward model; its held-out figures and statistics come from the manifest's
        `stats` ({n_pairs, held_out: {n, accuracy, accuracy_ci}, mean, std, usable})."""
        stats = manifest.get("stats", {})
        held = stats.get("held_out") or {}
        ci = held.get("accuracy_ci") or (None, None)
        with self._write("the reward model") as db:
            db["reward_models"].insert({
                "name": name, "model_id": model_id, "folder": folder, "run_id": run_id,
                "n_pairs": stats.get("n_pairs"), "held_out_n": held.get("n"),
                "held_out_accuracy": held.get("accuracy"), "held_out_ci_low": ci[0], "held_out_ci_high": ci[1],
                "reward_mean": stats.get("mean"), "reward_std": stats.get("std"),
                "usable": int(bool(stats.get("usable"))), "max_feedback_id": int(max_feedback_id),
                "manifest_json": json.dumps(manifest), "created_at": self._now(),
            })

    def reward_models(self, model_id: str) -> list[dict[str, Any]]:
        """Every reward model of this base model, oldest first."""
        return self._rows("select * from reward_models where model_id = ? order by id", [model_id])

    def reward_model(self, model_id: str, name: str) -> dict[str, Any] | None:
        rows = self._rows("select * from reward_models where model_id = ? and name = ?", [model_id, name])
        return rows[0] if rows else None

    def latest_reward_model(self, model_id: str, usable_only: bool = False) -> dict[str, Any] | None:
        where = " and usable = 1" if usable_only else ""
        rows = self._rows(f"select * from reward_models where model_id = ?{where} order by id desc limit 1",
                          [model_id])
        return rows[0] if rows else None

    def count_pairs_after(self, model_id: str, feedback_id: int, include_simulated: bool = True,
                          max_length: int | None = None, include_arena: bool = False,
                          without_users: tuple[str, ...] = ()) -> int:
        """Training pairs (not held out) from judgments newer than `feedback_id`: the pairs a reward model
        fitted up to that judgment has not seen (none of `without_users`')."""
        where, params = self._pair_filter(model_id, include_simulated, max_length, held_out=False, new=None,
                                          include_arena=include_arena, without_users=without_users)
        rows = self._rows(f"select count(*) as n from training_pairs p where {where} and p.newest_feedback_id > ?",
                          params + [int(feedback_id)])
        return int(rows[0]["n"])

    # -- the prompts PPO rolls out on -------------------------------------------------------------

    def rollout_contexts(self, model_id: str, n: int, seed: int = 0, held_out: bool = False,
                         include_simulated: bool = True) -> list[dict[str, Any]]:
        """Up to `n` contexts people wrote (each stored turn's messages, as the model saw them), drawn
        across conversations: a seeded shuffle of each conversation's turns, then one turn from each
        conversation in turn, so one long conversation does not fill the round. Conversations on the
        held-out side of the split (`store.pairs.is_held_out`) only with held_out=True (evaluation).
        Each row: turn_id, conversation_id, context (messages)."""
        where = "c.model_id = ?"
        params: list = [model_id]
        if not include_simulated:
            where += " and c.simulated = 0"
        rows = self._rows(
            "select t.id as turn_id, t.conversation_id, t.context_json from turns t"
            f" join conversations c on c.id = t.conversation_id where {where} order by t.id", params)
        by_conversation: dict[int, list[dict]] = {}
        for row in rows:
            if is_held_out(row["conversation_id"]) == held_out:
                by_conversation.setdefault(row["conversation_id"], []).append(row)
        rng = random.Random(seed)
        queues = list(by_conversation.values())
        rng.shuffle(queues)
        for queue in queues:
            rng.shuffle(queue)
        picked: list[dict] = []
        while queues and len(picked) < n:
            for queue in list(queues):
                if len(picked) >= n:
                    break
                picked.append(queue.pop())
                if not queue:
                    queues.remove(queue)
        return [{"turn_id": r["turn_id"], "conversation_id": r["conversation_id"],
                 "context": json.loads(r["context_json"])} for r in picked]

    # -- over-optimisation points (bench.overopt) -------------------------------------------------

    def add_overopt_points(self, points: list[dict[str, Any]]) -> None:
        with self._write("the over-optimisation points") as db:
            now = self._now()
            db["overopt_points"].insert_all([dict(p, created_at=now) for p in points])

    def overopt_points(self, model_id: str | None = None, bench_id: str | None = None) -> list[dict[str, Any]]:
        """Stored points, oldest first; only one base model's, or one run's, when given."""
        where, params = ["1 = 1"], []
        if model_id is not None:
            where.append("model_id = ?")
            params.append(model_id)
        if bench_id is not None:
            where.append("bench_id = ?")
            params.append(bench_id)
        return self._rows(f"select * from overopt_points where {' and '.join(where)} order by id", params)
