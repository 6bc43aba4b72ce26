"""Queries of the background evaluation: one version's run over the probe set, its samples and scores.

A mixin of `Store` (it uses the store's connection, lock and transactions), like `TrainingQueries`.
An evaluation is one attempt (a crashed one is retried once, as a new row with attempt 2); its samples
are the raw per-reply results and its pairs the held-out margins, from which the dashboard computes
every statistic. Statuses: 'running', then 'succeeded' or 'failed' (with the error).
"""

from __future__ import annotations

import json
from typing import Any

EVAL_STATUSES = ("running", "succeeded", "failed")
SAMPLE_FIELDS = ("probe_idx", "sample", "text", "n_tokens", "finish_reason", "token_ids_json", "logprob_sum",
                 "kl_v0", "kl_prev", "embedding")
PAIR_FIELDS = ("training_pair_id", "source_version", "margin")


class EvaluationQueries:
    # -- writes -----------------------------------------------------------------------------------

    def start_evaluation(self, model_id: str, version: str, parent: str | None, probe_set: str, n_probes: int,
                         samples_per_prompt: int, settings: dict, attempt: int = 1) -> int:
        """Record an attempt as 'running'; returns its id."""
        with self._write("the evaluation") as db:
            return int(db["evaluations"].insert({
                "model_id": model_id, "version": version, "parent": parent, "status": "running",
                "attempt": int(attempt), "probe_set": probe_set, "n_probes": int(n_probes),
                "samples_per_prompt": int(samples_per_prompt), "settings_json": json.dumps(settings, sort_keys=True),
                "started_at": self._now(),
            }).last_pk)

    def add_eval_samples(self, evaluation_id: int, samples: list[dict[str, Any]]) -> None:
        """Many samples in one transaction. Each: probe_idx, sample, text, n_tokens, finish_reason,
        token_ids (a list; or token_ids_json), logprob_sum, kl_v0, kl_prev (None for v0), embedding
        (float32 bytes, or None)."""
        rows = []
        for s in samples:
            row = {k: s.get(k) for k in SAMPLE_FIELDS}
            if row["token_ids_json"] is None and s.get("token_ids") is not None:
                row["token_ids_json"] = json.dumps([int(t) for t in s["token_ids"]])
            row["evaluation_id"] = evaluation_id
            rows.append(row)
        with self._write("the evaluation's samples") as db:
            if rows:
                db["eval_samples"].insert_all(rows)

    def add_eval_pairs(self, evaluation_id: int, pairs: list[dict[str, Any]]) -> None:
        """Held-out pair scores in one transaction. Each: training_pair_id, source_version, margin."""
        rows = [{**{k: p.get(k) for k in PAIR_FIELDS}, "evaluation_id": evaluation_id} for p in pairs]
        with self._write("the evaluation's pair scores") as db:
            if rows:
                db["eval_pairs"].insert_all(rows)

    def finish_evaluation(self, evaluation_id: int, metrics: dict) -> None:
        """The attempt succeeded; `metrics` is the evaluator's own summary (timings, counts)."""
        self._end_evaluation(evaluation_id, "succeeded", None, metrics)

    def fail_evaluation(self, evaluation_id: int, error: str, metrics: dict | None = None) -> None:
        self._end_evaluation(evaluation_id, "failed", error, metrics)

    def _end_evaluation(self, evaluation_id: int, status: str, error: str | None, metrics: dict | None) -> None:
        with self._write("the evaluation's result") as db:
            db.execute(
                "update evaluations set status = ?, error = ?, metrics_json = coalesce(?, metrics_json),"
                " finished_at = ? where id = ?",
                [status, error, json.dumps(metrics) if metrics is not None else None, self._now(), evaluation_id])

    def fail_interrupted_evaluations(self, reason: str) -> list[int]:
        """Mark attempts left 'running' (the app stopped under them) as failed; returns their ids."""
        with self._write("interrupted evaluations") as db:
            ids = [r["id"] for r in db.query("select id from evaluations where status = 'running'")]
            for evaluation_id in ids:
                db.execute("update evaluations set status = 'failed', error = ?, finished_at = ? where id = ?",
                           [reason, self._now(), evaluation_id])
            return ids

    # -- reads ------------------------------------------------------------------------------------

    def evaluation(self, evaluation_id: int) -> dict[str, Any] | None:
        rows = self._rows("select * from evaluations where id = ?", [evaluation_id])
        return rows[0] if rows else None

    def evaluations(self, model_id: str, all_attempts: bool = False,
                    probe_set: str | None = None) -> list[dict[str, Any]]:
        """A model's evaluations, oldest first: the newest attempt of each version (for one probe set when
        given), or with `all_attempts` every attempt."""
        where, params = "model_id = ?", [model_id]
        if probe_set is not None:
            where += " and probe_set = ?"
            params.append(probe_set)
        if all_attempts:
            return self._rows(f"select * from evaluations where {where} order by id", params)
        return self._rows(
            f"select * from evaluations where id in (select max(id) from evaluations where {where}"
            " group by version) order by id", params)

    def latest_succeeded_evaluation(self, model_id: str, version: str,
                                    probe_set: str | None = None) -> dict[str, Any] | None:
        """The newest succeeded evaluation of (model, version), for one probe set when given; None if none."""
        where, params = "model_id = ? and version = ? and status = 'succeeded'", [model_id, version]
        if probe_set is not None:
            where += " and probe_set = ?"
            params.append(probe_set)
        rows = self._rows(f"select * from evaluations where {where} order by id desc limit 1", params)
        return rows[0] if rows else None

    def eval_samples(self, evaluation_id: int) -> list[dict[str, Any]]:
        """An evaluation's samples by probe and sample; token_ids parsed, embedding as float32 bytes."""
        rows = self._rows("select * from eval_samples where evaluation_id = ? order by probe_idx, sample, id",
                          [evaluation_id])
        for row in rows:
            row["token_ids"] = json.loads(row.pop("token_ids_json") or "[]")
        return rows

    def eval_pairs(self, evaluation_id: int) -> list[dict[str, Any]]:
        """An evaluation's held-out pair scores, by training pair."""
        return self._rows("select * from eval_pairs where evaluation_id = ? order by training_pair_id, id",
                          [evaluation_id])

    def version_round_config(self, model_id: str, version: str) -> dict[str, Any]:
        """The DPO settings of the round that made `version` (as recorded on the round); {} for v0 or a
        version no recorded round made."""
        rows = self._rows("select config_json from training_runs where model_id = ? and version = ?"
                          " and status = 'succeeded' order by id desc limit 1", [model_id, version])
        return json.loads(rows[0]["config_json"] or "{}") if rows else {}
