"""Which judgments make preference pairs: the rules, the held-out split, and the kept pair index.

The rules (each judged pair of replies that was not regenerated away):
- a choice of A or B gives (context, chosen, rejected);
- an edit (the person's own better reply) gives (context, edit, A) and (context, edit, B);
- thumbs up on one reply and down on the other give a pair, unless a choice on the same pair already did;
- a tie, both-bad, a lone thumb, or two identical texts give none;
- an arena pair (two versions, shown blind) gives its pairs marked `arena`: rounds leave them out unless
  told to include them.

The held-out 10% is chosen by conversation (a hash of its id), not by pair, so that no conversation's
turns sit on both sides, and it stays the same across rounds.

The store applies the rules to a (turn, pair) each time its feedback changes, in the same transaction,
and keeps the result in `training_pairs`, one row per pair: so "how many new pairs wait" is an indexed
count (the status line asks every second), and the app's schedule and the trainer count the same
pairs by the same rules.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

HELD_OUT_BUCKETS = 10  # 1 bucket in 10: a held-out share of about 10%
# A pair's length in tokens as the trainer sees it is prompt + longer reply + the chat template's tail
# after the reply's last sampled token (the end-of-turn token when the reply was cut at the length
# limit, and the newline some templates add): counted generously so a pair kept here fits there.
TEMPLATE_TAIL_TOKENS = 2
# conversations.source of pairs brought in by `python -m store import` ("import:<file name>"); null for chat.
IMPORT_SOURCE_PREFIX = "import:"
# replies.policy_version of an imported pair's two replies: no version of ours sampled them, so the
# on-policy metrics (staleness, held-out accuracy by sampling version) leave them out.
IMPORT_VERSION = "import"


def is_held_out(conversation_id: int) -> bool:
    digest = hashlib.sha256(f"held-out:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def pair_rows(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The rules above, applied to one judged (turn, pair).

    `group` is a dict with turn_id, pair, conversation_id, superseded, replies {slot: {id, text,
    policy_version}} and feedback [{id, kind, value, reply_id}] (current judgments only, oldest first).
    Returns one dict per preference pair: source, chosen / rejected (texts), chosen_reply_id (None for an
    edit), rejected_reply_id, edit_feedback_id, feedback_ids, newest_feedback_id, policy_version.
    """
    replies = group["replies"]
    if group["superseded"] or set(replies) != {"a", "b"}:
        return []
    version = replies["a"].get("policy_version")
    # An arena pair (one reply from the live version, one from an earlier one) has two versions: it is
    # marked as such and named by its pair of versions, "v0|v3", in slot order.
    if replies["b"].get("policy_version") != version:
        version = f"{version}|{replies['b'].get('policy_version')}"
    pairs: dict[tuple, dict[str, Any]] = {}

    def add(chosen_slot_or_edit, rejected_slot: str, source: str, feedback_ids: list[int]) -> None:
        edit_id = None
        if isinstance(chosen_slot_or_edit, dict):  # an edit: the person's own text
            chosen, chosen_id, edit_id = chosen_slot_or_edit["value"], None, chosen_slot_or_edit["id"]
        else:
            chosen, chosen_id = replies[chosen_slot_or_edit]["text"], replies[chosen_slot_or_edit]["id"]
        rejected, rejected_id = replies[rejected_slot]["text"], replies[rejected_slot]["id"]
        if chosen == rejected or not chosen.strip():
            return
        key = (chosen, rejected)  # a choice and agreeing thumbs make one pair, not two
        if key not in pairs:
            pairs[key] = {
                "source": source, "chosen": chosen, "rejected": rejected, "chosen_reply_id": chosen_id,
                "rejected_reply_id": rejected_id, "edit_feedback_id": edit_id,
                "feedback_ids": tuple(feedback_ids), "newest_feedback_id": max(feedback_ids),
                "policy_version": version,
            }

    feedback = group["feedback"]
    choice = next((f for f in feedback if f["kind"] == "choice"), None)
    if choice is not None and choice["value"] in ("a", "b"):
        add(choice["value"], "b" if choice["value"] == "a" else "a", "choice", [choice["id"]])
    for edit in (f for f in feedback if f["kind"] == "edit"):
        add(edit, "a", "edit", [edit["id"]])
        add(edit, "b", "edit", [edit["id"]])
    if choice is None or choice["value"] not in ("a", "b"):
        ratings = {f["reply_id"]: f for f in feedback if f["kind"] == "rating"}
        slot_of = {replies[s]["id"]: s for s in ("a", "b")}
        ups = [slot_of[r] for r, f in ratings.items() if f["value"] == "up" and r in slot_of]
        downs = [slot_of[r] for r, f in ratings.items() if f["value"] == "down" and r in slot_of]
        if len(ups) == 1 and len(downs) == 1 and ups[0] != downs[0]:
            add(ups[0], downs[0], "ratings", [f["id"] for f in ratings.values()])
    return list(pairs.values())


def pair_length(prompt_tokens: int | None, chosen_tokens: int | None, rejected_tokens: int | None) -> int | None:
    """The pair's length in tokens as the trainer's length limit reads it; None when a part is unknown
    (rows stored before lengths were kept): such pairs are left for the trainer to measure."""
    if prompt_tokens is None or chosen_tokens is None or rejected_tokens is None:
        return None
    return int(prompt_tokens) + max(int(chosen_tokens), int(rejected_tokens)) + TEMPLATE_TAIL_TOKENS


def judged_groups(db, where: str = "", params: list | tuple = ()) -> list[dict]:
    """Judged (turn, pair)s as `store.pairs.pair_rows` takes them; `where` narrows the feedback rows."""
    groups: dict[tuple, dict] = {}
    # An older schema being migrated (m005 runs this) has no conversations.source yet.
    source = "c.source" if "source" in db["conversations"].columns_dict else "null as source"
    for row in db.query(
        "select f.id, f.turn_id, f.pair, f.kind, f.value, f.reply_id, f.n_tokens, t.conversation_id,"
        f" t.prompt_tokens, c.simulated, c.user, {source} from feedback f join turns t on t.id = f.turn_id"
        " join conversations c on c.id = t.conversation_id"
        f" where f.replaced_by is null {where} order by f.id", params
    ):
        group = groups.setdefault((row["turn_id"], row["pair"]), {
            "turn_id": row["turn_id"], "pair": row["pair"], "conversation_id": row["conversation_id"],
            "prompt_tokens": row["prompt_tokens"], "simulated": row["simulated"], "user": row["user"],
            "imported": int((row["source"] or "").startswith(IMPORT_SOURCE_PREFIX)), "replies": {},
            "feedback": [], "superseded": False,
        })
        group["feedback"].append({k: row[k] for k in ("id", "kind", "value", "reply_id", "n_tokens")})
    for (turn_id, pair), group in groups.items():
        for r in db.query("select id, slot, text, policy_version, n_tokens, superseded from replies"
                          " where turn_id = ? and pair = ?", [turn_id, pair]):
            group["replies"][r["slot"]] = {k: r[k] for k in ("id", "text", "policy_version", "n_tokens")}
            group["superseded"] = group["superseded"] or bool(r["superseded"])
    return list(groups.values())


def index_rows(group: dict) -> list[dict]:
    """The `training_pairs` rows of one judged (turn, pair)."""
    return [_index_row(group, row) for row in pair_rows(group)]


def _index_row(group: dict, row: dict) -> dict:
    tokens = {r["id"]: r["n_tokens"] for r in group["replies"].values()}
    edits = {f["id"]: f["n_tokens"] for f in group["feedback"] if f["kind"] == "edit"}
    chosen_tokens = edits.get(row["edit_feedback_id"]) if row["edit_feedback_id"] else tokens.get(row["chosen_reply_id"])
    return {
        "turn_id": group["turn_id"], "pair": group["pair"], "conversation_id": group["conversation_id"],
        "source": row["source"], "chosen_reply_id": row["chosen_reply_id"],
        "rejected_reply_id": row["rejected_reply_id"], "edit_feedback_id": row["edit_feedback_id"],
        "feedback_ids_json": json.dumps(list(row["feedback_ids"])), "newest_feedback_id": row["newest_feedback_id"],
        "policy_version": row["policy_version"], "held_out": int(is_held_out(group["conversation_id"])),
        "arena": int("|" in (row["policy_version"] or "")),
        "simulated": int(group["simulated"] or 0),
        "user": group.get("user"), "imported": int(group.get("imported") or 0),
        "n_tokens": pair_length(group["prompt_tokens"], chosen_tokens, tokens.get(row["rejected_reply_id"])),
    }
