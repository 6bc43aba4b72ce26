"""Queries of `python -m store export`: preference pairs, thumbs and arena votes with their provenance.

A mixin of `Store` (its connection and lock), like `TrainingQueries`. The pairs are the pair index's
(`store/pairs.py` rules), so an export holds exactly the pairs a round would see; the formats they are
written in are `store/formats.py`'s.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from store.pairs import IMPORT_SOURCE_PREFIX, is_held_out

SIMULATED_CHOICES = ("yes", "no", "all")
# An arena vote is a choice on a pair whose two replies two versions sampled; these are all its values.
ARENA_CHOICES = ("a", "b", "tie", "both_bad")


@dataclass(frozen=True)
class ExportFilter:
    """Which rows an export holds. Times are compared with the judgment's time (the newest judgment a pair
    comes from); `since` is inclusive, `until` exclusive."""

    since: str | None = None  # ISO 8601; a time without a zone is UTC
    until: str | None = None
    users: tuple[str, ...] = ()  # whose judgments; empty: everyone's
    versions: tuple[str, ...] = ()  # the versions that sampled the pair (an arena pair matches either)
    simulated: str = "all"  # "yes": only the autopilot's, "no": only people's, "all"
    include_held_out: bool = False  # the held-out 10% stays out unless asked (see `python -m store export -h`)

    def __post_init__(self):
        if self.simulated not in SIMULATED_CHOICES:
            raise ValueError(f"simulated must be one of {', '.join(SIMULATED_CHOICES)}, not {self.simulated!r}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, stored_time(value))
        if self.since and self.until and self.since >= self.until:
            raise ValueError(f"--since {self.since} is not before --until {self.until}")

    def describe(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "users": list(self.users), "versions": list(self.versions),
                "simulated": self.simulated, "include_held_out": self.include_held_out}


def stored_time(text: str) -> str:
    """An ISO 8601 time as the store writes its times (UTC, milliseconds), so that text order is time order."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (say 2026-12-01 or 2026-12-01T16:30:00+00:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _where(f: ExportFilter, time_col: str, user_col: str, version_cols: tuple[str, ...]) -> tuple[list[str], list]:
    where, params = [], []
    if f.since:
        where.append(f"{time_col} >= ?")
        params.append(f.since)
    if f.until:
        where.append(f"{time_col} < ?")
        params.append(f.until)
    if f.users:
        where.append(f"{user_col} in ({','.join('?' * len(f.users))})")
        params += list(f.users)
    if f.versions:
        # A version column holds "v3", or "v0|v3" for an arena pair: each part is matched exactly.
        parts = []
        for column in version_cols:
            for version in f.versions:
                parts.append(f"instr('|' || {column} || '|', '|' || ? || '|') > 0")
                params.append(version)
        where.append(f"({' or '.join(parts)})")
    if f.simulated != "all":
        where.append("conv.simulated = ?")
        params.append(int(f.simulated == "yes"))
    return where, params


class ExportQueries:
    def export_totals(self) -> dict[str, int]:
        """What the store holds whatever the filters: pairs (and how many held out), current thumbs, arena
        votes; an empty export says these, so a person sees which filter left everything out."""
        return self._rows(
            "select (select count(*) from training_pairs) as pairs,"
            " (select count(*) from training_pairs where held_out = 1) as held_out_pairs,"
            " (select count(*) from feedback where kind = 'rating' and replaced_by is null) as ratings,"
            " (select count(*) from feedback f join replies ra on ra.turn_id = f.turn_id and ra.pair = f.pair"
            " and ra.slot = 'a' join replies rb on rb.turn_id = f.turn_id and rb.pair = f.pair and rb.slot = 'b'"
            " where f.kind = 'choice' and f.replaced_by is null and ra.superseded = 0"
            " and ra.policy_version != rb.policy_version) as arena_votes")[0]

    def export_pairs(self, f: ExportFilter) -> list[dict[str, Any]]:
        """The pair index's pairs that pass the filter, oldest first, each with its texts, its prompt
        (`context`: the messages the model saw) and provenance: pair_id, conversation_id, turn_id, pair,
        source (choice, edit, ratings), policy_version, chosen_/rejected_ version and seed (None for an
        edit's own text), model_id, user, judged_at (the newest judgment's time), turn_created_at,
        feedback_ids, simulated, imported, held_out, arena, conversation_source."""
        where, params = _where(f, "f.created_at", "p.user", ("p.policy_version",))
        if not f.include_held_out:
            where.append("p.held_out = 0")
        rows = self._rows(
            "select p.id as pair_id, p.conversation_id, p.turn_id, p.pair, p.source, p.policy_version,"
            " c.policy_version as chosen_version, r.policy_version as rejected_version, c.seed as chosen_seed,"
            " r.seed as rejected_seed, conv.model_id, p.user, f.created_at as judged_at,"
            " t.created_at as turn_created_at, p.feedback_ids_json, p.simulated, p.imported, p.held_out, p.arena,"
            " conv.source as conversation_source, t.context_json, t.user_message,"
            " coalesce(e.value, c.text) as chosen, r.text as rejected"
            " from training_pairs p join turns t on t.id = p.turn_id"
            " join conversations conv on conv.id = p.conversation_id"
            " join feedback f on f.id = p.newest_feedback_id join replies r on r.id = p.rejected_reply_id"
            " left join replies c on c.id = p.chosen_reply_id left join feedback e on e.id = p.edit_feedback_id"
            f" where {' and '.join(where) or '1 = 1'} order by p.id", params)
        for row in rows:
            row["context"] = json.loads(row.pop("context_json"))
            row["feedback_ids"] = json.loads(row.pop("feedback_ids_json"))
        return rows

    def export_ratings(self, f: ExportFilter) -> list[dict[str, Any]]:
        """Current thumbs (up or down) on replies that were not regenerated away, oldest first: feedback_id,
        rating, user, judged_at, reply_id, text, policy_version, seed, model_id, conversation_id, turn_id,
        context (messages), simulated, imported, held_out (by conversation, as the pairs' split)."""
        where, params = _where(f, "f.created_at", "f.user", ("r.policy_version",))
        rows = self._rows(
            "select f.id as feedback_id, f.value as rating, f.user, f.created_at as judged_at, r.id as reply_id,"
            " r.text, r.policy_version, r.seed, conv.model_id, t.conversation_id, t.id as turn_id, t.context_json,"
            " conv.simulated, conv.source as conversation_source from feedback f join replies r on r.id = f.reply_id"
            " join turns t on t.id = f.turn_id join conversations conv on conv.id = t.conversation_id"
            " where f.kind = 'rating' and f.replaced_by is null and r.superseded = 0"
            f"{''.join(' and ' + w for w in where)} order by f.id", params)
        out = []
        for row in rows:
            row["held_out"] = int(is_held_out(row["conversation_id"]))
            if row["held_out"] and not f.include_held_out:
                continue
            row["context"] = json.loads(row.pop("context_json"))
            row["imported"] = int((row["conversation_source"] or "").startswith(IMPORT_SOURCE_PREFIX))
            out.append(row)
        return out

    def export_arena_votes(self, f: ExportFilter) -> list[dict[str, Any]]:
        """Current choices (a, b, tie, both-bad) on arena pairs (two versions, shown blind) that were not
        regenerated away, oldest first: feedback_id, turn_id, pair, choice, user, judged_at, a_version,
        b_version, a_text, b_text, a_tokens, b_tokens, model_id, context (messages), prompt_tokens,
        simulated. The held-out split is the training rounds' and does not apply: a leaderboard reads
        every vote."""
        where, params = _where(f, "f.created_at", "f.user", ("ra.policy_version", "rb.policy_version"))
        rows = self._rows(
            "select f.id as feedback_id, f.turn_id, f.pair, f.value as choice, f.user, f.created_at as judged_at,"
            " ra.policy_version as a_version, rb.policy_version as b_version, ra.text as a_text, rb.text as b_text,"
            " ra.n_tokens as a_tokens, rb.n_tokens as b_tokens, conv.model_id, t.context_json, t.prompt_tokens,"
            " conv.simulated from feedback f join turns t on t.id = f.turn_id"
            " join conversations conv on conv.id = t.conversation_id"
            " join replies ra on ra.turn_id = f.turn_id and ra.pair = f.pair and ra.slot = 'a'"
            " join replies rb on rb.turn_id = f.turn_id and rb.pair = f.pair and rb.slot = 'b'"
            " where f.kind = 'choice' and f.replaced_by is null and ra.superseded = 0"
            " and ra.policy_version != rb.policy_version"
            f"{''.join(' and ' + w for w in where)} order by f.id", params)
        for row in rows:
            row["context"] = json.loads(row.pop("context_json"))
        return rows
