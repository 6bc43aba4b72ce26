"""Queries of the training loop: judged pairs to train on, rounds, their curves, versions, what is live.

A mixin of `Store` (it uses the store's connection, lock and transactions); kept apart so that the
chat's queries and the loop's each read as one file.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

RUN_STATUSES = ("running", "succeeded", "failed", "skipped")
LIVE_ACTIONS = ("start", "promote", "rollback")


class TrainingQueries:
    # -- the data a round trains on ---------------------------------------------------------------

    def count_new_pairs(self, model_id: str, include_simulated: bool = True, max_length: int | None = None,
                        include_arena: bool = False, without_users: Collection[str] = ()) -> int:
        """Training pairs (not held out) from judgments no successful round of this model has consumed,
        within `max_length` tokens when given: what the schedule's threshold and the trainer both count.
        An indexed count, the same cost at a hundred judgments and at a hundred thousand. Every query
        here leaves out the pairs of `without_users` (the annotators excluded from training)."""
        where, params = self._pair_filter(model_id, include_simulated, max_length, held_out=False, new=True,
                                          include_arena=include_arena, without_users=without_users)
        return int(self._rows(f"select count(*) as n from training_pairs p where {where}", params)[0]["n"])

    def training_pairs(self, model_id: str, *, held_out: bool, new: bool | None, include_simulated: bool = True,
                       max_length: int | None = None, ids: list[int] | None = None,
                       include_arena: bool = False, include_imported: bool = True,
                       without_users: Collection[str] = ()) -> list[dict[str, Any]]:
        """Pairs with their texts and context, oldest first: new (True), already consumed (False) or both
        (None); within `max_length` when given; only `ids` when given. Each row has the
        `training_pairs` columns plus context (messages), chosen and rejected, and how each reply was
        sampled: chosen_/rejected_ logprob_sum, temperature and top_p (the chosen ones None for an edit,
        the person's own text). Arena pairs only with `include_arena`; imported pairs (`python -m store
        import`) unless `include_imported` is False (the on-policy metrics leave them out); never the pairs
        of `without_users` (annotators excluded from training)."""
        where, params = self._pair_filter(model_id, include_simulated, max_length, held_out, new, include_arena,
                                          without_users)
        if not include_imported:
            where += " and p.imported = 0"
        if ids is not None:
            if not ids:
                return []
            where += f" and p.id in ({','.join('?' * len(ids))})"
            params += list(ids)
        rows = self._rows(
            "select p.*, t.context_json, coalesce(e.value, c.text) as chosen, r.text as rejected,"
            " c.logprob_sum as chosen_logprob_sum, c.temperature as chosen_temperature, c.top_p as chosen_top_p,"
            " r.logprob_sum as rejected_logprob_sum, r.temperature as rejected_temperature,"
            " r.top_p as rejected_top_p"
            " from training_pairs p join turns t on t.id = p.turn_id join replies r on r.id = p.rejected_reply_id"
            " left join replies c on c.id = p.chosen_reply_id left join feedback e on e.id = p.edit_feedback_id"
            f" where {where} order by p.newest_feedback_id, p.id", params)
        for row in rows:
            row["context"] = json.loads(row.pop("context_json"))
            row["feedback_ids"] = tuple(json.loads(row.pop("feedback_ids_json")))
        return rows

    def training_pair_ids(self, model_id: str, *, held_out: bool, new: bool | None, include_simulated: bool = True,
                          max_length: int | None = None, include_arena: bool = False,
                          without_users: Collection[str] = ()) -> list[int]:
        """The ids alone (cheap): a round samples its replay from these, then loads only the sample."""
        where, params = self._pair_filter(model_id, include_simulated, max_length, held_out, new, include_arena,
                                          without_users)
        return [r["id"] for r in self._rows(f"select p.id from training_pairs p where {where} order by p.id", params)]

    def count_too_long_pairs(self, model_id: str, max_length: int, include_simulated: bool = True,
                             include_arena: bool = False, without_users: Collection[str] = ()) -> int:
        """New training pairs longer than `max_length`: counted, never trained on."""
        where, params = self._pair_filter(model_id, include_simulated, None, held_out=False, new=True,
                                          include_arena=include_arena, without_users=without_users)
        return int(self._rows(f"select count(*) as n from training_pairs p where {where} and p.n_tokens > ?",
                              params + [max_length])[0]["n"])

    def newest_pair_feedback_id(self) -> int:
        """The newest judgment any pair comes from: a round that consumes every pair records this."""
        return int(self._rows("select max(newest_feedback_id) as m from training_pairs")[0]["m"] or 0)

    def _pair_filter(self, model_id: str, include_simulated: bool, max_length: int | None, held_out: bool,
                     new: bool | None, include_arena: bool = False,
                     without_users: Collection[str] = ()) -> tuple[str, list]:
        where, params = ["p.held_out = ?"], [int(held_out)]
        users = sorted(set(without_users))
        if users:
            # A pair with no user (indexed before m008 knew whose it was) belongs to nobody excluded.
            where.append(f"(p.user is null or p.user not in ({','.join('?' * len(users))}))")
            params += users
        if not include_arena:
            where.append("p.arena = 0")
        if new is not None:
            where.append("p.newest_feedback_id > ?" if new else "p.newest_feedback_id <= ?")
            params.append(self.last_consumed_feedback_id(model_id))
        if not include_simulated:
            where.append("p.simulated = 0")
        if max_length is not None:
            where.append("(p.n_tokens is null or p.n_tokens <= ?)")
            params.append(int(max_length))
        return " and ".join(where), params

    def last_consumed_feedback_id(self, model_id: str) -> int:
        """Feedback up to this id was in a successful round; later feedback makes 'new' pairs."""
        row = self._rows(
            "select max(max_feedback_id) as m from training_runs where status = 'succeeded' and model_id = ?",
            [model_id],
        )[0]
        return int(row["m"] or 0)

    # -- rounds -----------------------------------------------------------------------------------

    def create_run(self, algo: str, config: dict, model_id: str, parent_version: str, trigger: str) -> int:
        with self._write("the training round") as db:
            return int(db["training_runs"].insert({
                "algo": algo, "status": "running", "config_json": json.dumps(config), "model_id": model_id,
                "parent_version": parent_version, "trigger": trigger, "started_at": self._now(),
            }).last_pk)

    def set_run_reward_model(self, run_id: int, reward_model: str) -> None:
        """The reward model a PPO round uses, recorded as soon as it is chosen (or trained)."""
        with self._write("the round's reward model") as db:
            db.execute("update training_runs set reward_model = ? where id = ?", [reward_model, run_id])

    def set_run_pid(self, run_id: int, pid: int) -> None:
        with self._write("the round's process id") as db:
            db.execute("update training_runs set pid = ? where id = ?", [pid, run_id])

    def update_run_progress(self, run_id: int, step: int, total_steps: int, loss: float | None,
                            metrics: dict[str, float] | None = None) -> None:
        with self._write("the round's progress") as db:
            db.execute("update training_runs set step = ?, total_steps = ?, loss = ? where id = ?",
                       [step, total_steps, loss, run_id])
            if metrics:
                db["metrics"].insert_all(
                    [{"run_id": run_id, "step": step, "name": k, "value": float(v)} for k, v in metrics.items()
                     if v is not None]
                )

    def finish_run(self, run_id: int, status: str, reason: str | None = None, version: str | None = None,
                   n_pairs: int | None = None, metrics: dict | None = None,
                   max_feedback_id: int | None = None, reward_model: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self._write("the round's result") as db:
            db.execute(
                "update training_runs set status = ?, reason = ?, version = coalesce(?, version),"
                " n_pairs = coalesce(?, n_pairs), metrics_json = coalesce(?, metrics_json),"
                " max_feedback_id = coalesce(?, max_feedback_id), reward_model = coalesce(?, reward_model),"
                " finished_at = ? where id = ?",
                [status, reason, version, n_pairs, json.dumps(metrics) if metrics is not None else None,
                 max_feedback_id, reward_model, self._now(), run_id],
            )

    def fail_interrupted_runs(self, reason: str) -> list[int]:
        """Mark rounds left 'running' (their process is gone) as failed; returns their ids."""
        with self._write("interrupted rounds") as db:
            ids = [r["id"] for r in db.query("select id from training_runs where status = 'running'")]
            for run_id in ids:
                db.execute("update training_runs set status = 'failed', reason = ?, finished_at = ? where id = ?",
                           [reason, self._now(), run_id])
            return ids

    def fail_run_if_running(self, run_id: int, reason: str) -> bool:
        with self._write("the round's failure") as db:
            cursor = db.execute(
                "update training_runs set status = 'failed', reason = ?, finished_at = ?"
                " where id = ? and status = 'running'", [reason, self._now(), run_id])
            return cursor.rowcount > 0

    def run(self, run_id: int) -> dict[str, Any] | None:
        rows = self._rows("select * from training_runs where id = ?", [run_id])
        return rows[0] if rows else None

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._rows("select * from training_runs order by id desc limit ?", [limit])

    def running_run(self) -> dict[str, Any] | None:
        rows = self._rows("select * from training_runs where status = 'running' order by id desc limit 1")
        return rows[0] if rows else None

    def metrics_for_run(self, run_id: int) -> list[dict[str, Any]]:
        return self._rows("select step, name, value from metrics where run_id = ? order by name, step", [run_id])

    # -- versions and what is live ----------------------------------------------------------------

    def next_version_name(self, model_id: str) -> str:
        rows = self._rows("select name from policy_versions where model_id = ?", [model_id])
        numbers = [int(r["name"][1:]) for r in rows if r["name"][1:].isdigit()]
        return f"v{max(numbers, default=0) + 1}"

    def record_version(self, name: str, model_id: str, parent: str, adapter_dir: str, manifest: dict) -> None:
        """Record a published version; the algorithm that made it is the manifest's `algo`."""
        with self._write("the new version") as db:
            db["policy_versions"].insert({
                "name": name, "model_id": model_id, "parent": parent, "adapter_dir": adapter_dir,
                "manifest_json": json.dumps(manifest), "algo": manifest.get("algo", "dpo"), "created_at": self._now(),
            })

    def version(self, model_id: str, name: str) -> dict[str, Any] | None:
        rows = self._rows("select * from policy_versions where model_id = ? and name = ?", [model_id, name])
        return rows[0] if rows else None

    def record_live(self, model_id: str, version: str, action: str, note: str | None = None) -> None:
        if action not in LIVE_ACTIONS:
            raise ValueError(f"unknown live action {action!r}")
        with self._write("the live version") as db:
            db["live_events"].insert({"model_id": model_id, "version": version, "action": action, "note": note,
                                      "created_at": self._now()})

    def live_version(self, model_id: str) -> str | None:
        rows = self._rows("select version from live_events where model_id = ? order by id desc limit 1", [model_id])
        return rows[0]["version"] if rows else None

    def live_events(self, model_id: str) -> list[dict[str, Any]]:
        return self._rows("select * from live_events where model_id = ? order by id", [model_id])
