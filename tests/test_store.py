"""The store on real SQLite files: migrations, every query, history of votes, and refusals."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from store import FeedbackError, Store, StoreError
from store import migrations as schema

NASTY = "nul\x00 bell\x07 emoji 🙂🚀 rtl שלום مرحبا <script>alert(1)</script> [x](javascript:alert(1))"


def reply(slot, text="hello", **extra):
    row = {
        "slot": slot, "text": text, "policy_version": "v0", "model_id": "tiny", "seed": 7 if slot == "a" else 8,
        "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 32, "finish_reason": "stop", "n_tokens": 3,
        "logprob_sum": -4.5, "latency_s": 0.1, "ttft_s": 0.01, "token_ids_json": "[1, 2, 3]",
    }
    row.update(extra)
    return row


def a_turn(store, text="hi"):
    conv = store.start_conversation("sess", "alice", "tiny", "")
    turn_id, reply_ids = store.record_turn(conv, 0, [{"role": "user", "content": text}], text,
                                           [reply("a"), reply("b", "hey")])
    return conv, turn_id, reply_ids


def test_fresh_database_has_every_table_wal_and_foreign_keys(store):
    names = set(store.db.table_names())
    assert {"conversations", "turns", "replies", "feedback", "policy_versions", "training_runs"} <= names
    assert store.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("pragma foreign_keys").fetchone()[0] == 1
    assert schema.applied_names(store.db) == schema.all_names()
    assert schema.all_names()[:3] == ["m001_initial", "m002_provenance_and_history", "m003_training_loop"]


@pytest.mark.parametrize("stop_before", schema.all_names()[1:])
def test_migrating_a_database_from_an_older_schema_keeps_its_rows(tmp_path, stop_before):
    path = tmp_path / "old.db"
    from sqlite_utils import Database

    db = Database(path)  # a database as an older release left it
    schema.apply(db, stop_before=stop_before)
    assert schema.applied_names(db) == schema.all_names()[: schema.all_names().index(stop_before)]
    db["conversations"].insert({"id": 1, "session_id": "s", "user": "u", "model_id": "m", "system_prompt": "",
                                "created_at": "t"})
    db["turns"].insert({"id": 1, "conversation_id": 1, "idx": 0, "context_json": "[]", "user_message": "old",
                        "created_at": "t"})
    db["replies"].insert({"id": 1, "turn_id": 1, "pair": 0, "slot": "a", "text": "kept", "policy_version": "v0"})
    db.conn.close()

    upgraded = Store(path)
    assert schema.applied_names(upgraded.db) == schema.all_names()
    assert "ttft_s" in upgraded.db["replies"].columns_dict
    assert "replaced_by" in upgraded.db["feedback"].columns_dict
    assert {"metrics", "live_events"} <= set(upgraded.db.table_names())
    assert upgraded.replies_for_turn(1)[0]["text"] == "kept"
    Store(path).close()  # migrating again is a no-op
    upgraded.close()


def test_turn_and_replies_round_trip_exactly(store):
    conv, turn_id, reply_ids = a_turn(store, NASTY)
    turn = store.turns_for_conversation(conv)[0]
    assert turn["user_message"] == NASTY
    assert json.loads(turn["context_json"])[0]["content"] == NASTY
    rows = store.replies_for_turn(turn_id)
    assert [r["id"] for r in rows] == reply_ids
    assert [r["slot"] for r in rows] == ["a", "b"]
    assert rows[0]["seed"] == 7 and rows[0]["logprob_sum"] == -4.5 and rows[0]["superseded"] == 0
    assert store.conversation(conv)["user"] == "alice"


def test_a_pair_needs_both_slots(store):
    conv = store.start_conversation("s", "u", "m", "")
    with pytest.raises(ValueError):
        store.record_turn(conv, 0, [], "x", [reply("a")])
    assert store.stats()["turns"] == 0


def test_second_vote_replaces_the_first_and_keeps_it(store):
    _, turn_id, _ = a_turn(store)
    first = store.record_choice(turn_id, 0, "a", "alice", "sess")
    second = store.record_choice(turn_id, 0, "b", "alice", "sess")
    rows = store.feedback_for_turn(turn_id)
    assert [(r["id"], r["value"], r["replaced_by"]) for r in rows] == [(first, "a", second), (second, "b", None)]
    assert [r["value"] for r in store.feedback_for_turn(turn_id, current_only=True)] == ["b"]


def test_ratings_are_per_reply_and_edits_per_pair(store):
    _, turn_id, (ra, rb) = a_turn(store)
    store.record_rating(ra, "up", "u", "s")
    store.record_rating(rb, "down", "u", "s")
    store.record_rating(ra, "down", "u", "s")  # replaces only A's rating
    store.record_edit(turn_id, 0, NASTY, "u", "s")
    current = store.feedback_for_turn(turn_id, current_only=True)
    assert sorted((r["kind"], r["reply_id"], r["value"]) for r in current) == sorted(
        [("rating", ra, "down"), ("rating", rb, "down"), ("edit", None, NASTY)]
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t, r: s.record_choice(t, 0, "maybe", "u", "s"), "unknown choice"),
        (lambda s, t, r: s.record_choice(t, 5, "a", "u", "s"), "no pair 5"),
        (lambda s, t, r: s.record_rating(r[0], "meh", "u", "s"), "unknown rating"),
        (lambda s, t, r: s.record_rating(999, "up", "u", "s"), "no reply 999"),
        (lambda s, t, r: s.record_edit(t, 0, "   ", "u", "s"), "empty"),
    ],
)
def test_invalid_feedback_is_refused_and_writes_nothing(store, call, message):
    _, turn_id, reply_ids = a_turn(store)
    with pytest.raises(FeedbackError, match=message):
        call(store, turn_id, reply_ids)
    assert store.stats()["feedback"] == 0


def test_regenerate_supersedes_the_old_pair_and_votes_on_it_are_refused(store):
    _, turn_id, old_ids = a_turn(store)
    pair, new_ids = store.record_regenerated_pair(turn_id, [reply("a", "new a"), reply("b", "new b")])
    assert pair == 1
    rows = {r["id"]: r for r in store.replies_for_turn(turn_id)}
    assert all(rows[i]["superseded"] == 1 for i in old_ids)
    assert all(rows[i]["superseded"] == 0 and rows[i]["pair"] == 1 for i in new_ids)
    with pytest.raises(FeedbackError, match="regenerated"):
        store.record_choice(turn_id, 0, "a", "u", "s")
    with pytest.raises(FeedbackError, match="regenerated"):
        store.record_rating(old_ids[0], "up", "u", "s")
    store.record_choice(turn_id, 1, "b", "u", "s")
    assert store.stats()["feedback"] == 1
    assert store.stats()["superseded_replies"] == 2


def test_locked_database_reports_and_writes_nothing(tmp_path):
    path = tmp_path / "locked.db"
    store = Store(path, busy_timeout_ms=100)
    _, turn_id, _ = a_turn(store)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("begin exclusive")
    try:
        with pytest.raises(StoreError, match="locked"):
            store.record_choice(turn_id, 0, "a", "u", "s")
    finally:
        other.execute("rollback")
        other.close()
    assert store.stats()["feedback"] == 0
    store.record_choice(turn_id, 0, "a", "u", "s")  # works again once the lock is gone
    assert store.stats()["feedback"] == 1


def test_read_only_database_reports_and_writes_nothing(tmp_path):
    path = tmp_path / "ro.db"
    store = Store(path)
    _, turn_id, _ = a_turn(store)
    store.close()
    # A read-only connection gives the same refusal as a read-only mount.
    read_only = Store(f"file:{path}?mode=ro", busy_timeout_ms=100)
    with pytest.raises(StoreError, match="read-only"):
        read_only.record_choice(turn_id, 0, "a", "u", "s")
    read_only.close()
    assert Store(path).stats()["feedback"] == 0


def test_half_failed_turn_leaves_nothing(store):
    conv = store.start_conversation("s", "u", "m", "")
    bad_b = reply("b")
    bad_b["slot"] = "b"
    bad_b["text"] = None  # NOT NULL: the second insert fails inside the transaction
    with pytest.raises(StoreError):
        store.record_turn(conv, 0, [], "x", [reply("a"), bad_b])
    assert store.stats()["turns"] == 0 and store.stats()["replies"] == 0


def test_base_version_recorded_once_per_model(store):
    assert store.ensure_base_version("tiny") == "v0"
    store.ensure_base_version("tiny")
    store.ensure_base_version("other")
    assert [(v["name"], v["model_id"]) for v in store.policy_versions()] == [("v0", "tiny"), ("v0", "other")]


def test_stats_cli_prints_counts_as_json(tmp_path):
    path = tmp_path / "cli.db"
    store = Store(path)
    _, turn_id, _ = a_turn(store)
    store.record_choice(turn_id, 0, "tie", "u", "s")
    store.close()
    out = subprocess.run([sys.executable, "-m", "store", "stats", "--db", str(path)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    stats = json.loads(out.stdout)
    assert stats["turns"] == 1 and stats["replies"] == 2 and stats["feedback"] == 1
    assert stats["current_feedback"] == {"choice": {"tie": 1}}


def test_full_disk_reports_and_writes_nothing(tmp_path):
    path = tmp_path / "full.db"
    store = Store(path)
    _, turn_id, _ = a_turn(store)
    pages = store.db.execute("pragma page_count").fetchone()[0]
    # Cap the file at its current size: the next write that needs a page fails as a full disk does.
    store.db.execute(f"pragma max_page_count = {pages}")
    with pytest.raises(StoreError, match="disk is full"):
        store.record_edit(turn_id, 0, "x" * 100_000, "u", "s")
    assert store.stats()["feedback"] == 0
    store.close()
