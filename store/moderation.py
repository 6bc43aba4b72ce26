"""Queries of the moderation hook: refusals recorded on their turn (`turns.moderation_json`).

A mixin of `Store`. A turn's `moderation_json` is a JSON list, one record per refusal, oldest first:
`{"role": "user", "reason", "hook", "failed", "at"}` for a refused message (its turn has no replies) and
`{"role": "assistant", "pair", "slot", "reason", "hook", "failed", "at"}` for a withheld reply, and
`{"role": "user", "pair", "edit": true, ...}` for a better reply the hook refused (not saved); `failed`
is true when the hook itself broke and the text was refused for that (the hook fails closed). A pair
with a withheld reply takes no judgment: `check_not_withheld` refuses it inside the judgment's own
transaction, so it can produce no training pair.
"""

from __future__ import annotations

import json
from typing import Any

MODERATION_ROLES = ("user", "assistant")


class ModerationQueries:
    def record_refused_message(self, conversation_id: int, idx: int, context: list[dict[str, str]],
                               user_message: str, refusal: dict[str, Any],
                               prompt_tokens: int | None = None) -> int:
        """A message the hook refused: a turn with no replies and its refusal, written together."""
        record = self._moderation_record(refusal, "user")
        with self._write("the refused message") as db:
            return int(db["turns"].insert({
                "conversation_id": conversation_id, "idx": idx,
                "context_json": json.dumps(context, ensure_ascii=False), "user_message": user_message,
                "prompt_tokens": prompt_tokens, "created_at": self._now(),
                "moderation_json": json.dumps([record], ensure_ascii=False),
            }).last_pk)

    def add_moderation(self, turn_id: int, refusals: list[dict[str, Any]]) -> None:
        """Append refusals to their turn: withheld replies (role "assistant", the default; call inside
        `batch()` with the pair's write) or a refused better reply (role "user" with `pair`)."""
        records = [self._moderation_record(r, r.get("role", "assistant")) for r in refusals]
        with self._write("the moderation record") as db:
            rows = list(db.query("select moderation_json from turns where id = ?", [turn_id]))
            if not rows:
                raise ValueError(f"no turn {turn_id}")
            kept = json.loads(rows[0]["moderation_json"] or "[]")
            db.execute("update turns set moderation_json = ? where id = ?",
                       [json.dumps(kept + records, ensure_ascii=False), turn_id])

    def moderation_for_turn(self, turn_id: int) -> list[dict[str, Any]]:
        rows = self._rows("select moderation_json from turns where id = ?", [turn_id])
        return json.loads(rows[0]["moderation_json"] or "[]") if rows else []

    def refused_turns(self, conversation_id: int | None = None) -> list[dict[str, Any]]:
        """Turns with a refusal, oldest first, each with its records parsed as `moderation`."""
        where, params = ("and conversation_id = ?", [conversation_id]) if conversation_id is not None else ("", [])
        rows = self._rows(f"select * from turns where moderation_json is not null {where} order by id", params)
        for row in rows:
            row["moderation"] = json.loads(row["moderation_json"])
        return rows

    @staticmethod
    def check_not_withheld(db, turn_id: int, pair: int) -> str | None:
        """The reason a reply of this pair was withheld, or None (used by the judgment writes)."""
        rows = list(db.query("select moderation_json from turns where id = ?", [turn_id]))
        for record in json.loads((rows[0]["moderation_json"] if rows else None) or "[]"):
            if record.get("role") == "assistant" and record.get("pair") == pair:
                return record.get("reason") or "withheld"
        return None

    def _moderation_record(self, refusal: dict[str, Any], role: str) -> dict[str, Any]:
        if role not in MODERATION_ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {MODERATION_ROLES}")
        if not str(refusal.get("reason") or "").strip():
            raise ValueError("a refusal needs its reason")
        record = {"role": role, **{k: v for k, v in refusal.items() if k != "role"}, "at": self._now()}
        if role == "assistant" and (not isinstance(record.get("pair"), int) or record.get("slot") not in ("a", "b")):
            raise ValueError(f"a withheld reply's refusal needs its pair and slot, got {refusal}")
        return record
