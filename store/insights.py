"""Queries the dashboard reads from people's judgments: votes with both replies, arena counts, prompts.

A mixin of `Store` (its connection, lock and transactions), like `TrainingQueries`.
"""

from __future__ import annotations

from typing import Any

# The user prompts the input-side drift reads at most (the newest ones): embedding every prompt of a
# store of 100,000 judgments at each refresh would cost minutes, a spread sample of this many describes
# the drift as well.
MAX_PROMPTS_READ = 2000


class InsightQueries:
    def votes(self, model_id: str) -> list[dict[str, Any]]:
        """Every current choice (a, b, tie or both-bad) on a pair of this model that was not regenerated
        away, oldest first, with both replies: {feedback_id, turn_id, pair, choice, user, simulated,
        created_at, context_json, a_version, b_version, a_tokens, b_tokens, a_text, b_text}."""
        return self._rows(
            "select f.id as feedback_id, f.turn_id, f.pair, f.value as choice, f.user, c.simulated,"
            " f.created_at, t.context_json,"
            " ra.policy_version as a_version, rb.policy_version as b_version, ra.n_tokens as a_tokens,"
            " rb.n_tokens as b_tokens, ra.text as a_text, rb.text as b_text"
            " from feedback f join turns t on t.id = f.turn_id join conversations c on c.id = t.conversation_id"
            " join replies ra on ra.turn_id = f.turn_id and ra.pair = f.pair and ra.slot = 'a'"
            " join replies rb on rb.turn_id = f.turn_id and rb.pair = f.pair and rb.slot = 'b'"
            " where f.kind = 'choice' and f.replaced_by is null and ra.superseded = 0 and c.model_id = ?"
            " order by f.id", [model_id])

    def arena_vote_counts(self, model_id: str, version: str) -> dict[str, int]:
        """How many current votes each other version has against `version` in arena pairs."""
        rows = self._rows(
            "select case when ra.policy_version = ? then rb.policy_version else ra.policy_version end as other,"
            " count(*) as n from feedback f join turns t on t.id = f.turn_id"
            " join conversations c on c.id = t.conversation_id"
            " join replies ra on ra.turn_id = f.turn_id and ra.pair = f.pair and ra.slot = 'a'"
            " join replies rb on rb.turn_id = f.turn_id and rb.pair = f.pair and rb.slot = 'b'"
            " where f.kind = 'choice' and f.replaced_by is null and c.model_id = ?"
            " and ra.policy_version != rb.policy_version and ? in (ra.policy_version, rb.policy_version)"
            " group by other", [version, model_id, version])
        return {r["other"]: int(r["n"]) for r in rows}

    def pair_texts_counts(self, model_id: str) -> dict[str, int]:
        """{n: stored pairs (turn, pair) of this model, n_identical: those whose two replies are the same
        text}: identical pairs make no training pair, and are counted here rather than dropped unseen."""
        row = self._rows(
            "select count(*) as n, coalesce(sum(ra.text = rb.text), 0) as n_identical from replies ra"
            " join replies rb on rb.turn_id = ra.turn_id and rb.pair = ra.pair and rb.slot = 'b'"
            " where ra.slot = 'a' and ra.model_id = ?", [model_id])[0]
        return {"n": int(row["n"]), "n_identical": int(row["n_identical"])}

    def user_prompts(self, model_id: str, limit: int = MAX_PROMPTS_READ) -> list[dict[str, Any]]:
        """User messages of this model's conversations, oldest first: every one up to `limit`, past it an
        evenly spread sample of `limit` (by turn id), so time windows stay comparable."""
        total = int(self._rows(
            "select count(*) as n from turns t join conversations c on c.id = t.conversation_id where c.model_id = ?",
            [model_id])[0]["n"])
        stride = max(1, -(-total // max(1, limit)))
        return self._rows(
            "select id, created_at, user_message from (select t.id, t.created_at, t.user_message,"
            " row_number() over (order by t.id) as k from turns t join conversations c on c.id = t.conversation_id"
            " where c.model_id = ?) where (k - 1) % ? = 0 order by id", [model_id, stride])

    def change_marker(self) -> tuple:
        """A cheap fingerprint of everything the dashboard reads: it changes when a judgment, turn, round,
        evaluation, live switch, reward model, over-optimisation point or annotator exclusion is written (the
        dashboard recomputes only then)."""
        row = self._rows(
            "select (select max(id) from feedback) as f, (select max(id) from turns) as t,"
            " (select max(id) from training_runs) as r, (select max(coalesce(finished_at, started_at) || id)"
            " from training_runs) as rf, (select max(id) from live_events) as l,"
            " (select count(*) from evaluations where status != 'running') as e,"
            " (select max(id) from evaluations) as ei, (select max(id) from metrics) as m,"
            " (select max(id) from reward_models) as rm, (select max(id) from overopt_points) as o,"
            " (select max(id) from annotator_exclusions) as x")[0]
        return tuple(row.values())
