"""Every query the playground runs. Nothing outside `store/` writes SQL.

One `Store` per process wraps one SQLite connection (WAL, foreign keys on) behind a lock, so Gradio's
worker threads can share it; the trainer subprocess opens its own. Each write is one transaction: a
failure leaves nothing half-written and surfaces as `StoreError`, whose message is safe to show a
person ("database is locked", "disk is full", "read-only").
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from store import migrations
from store.pairs import index_rows, judged_groups
from store.annotators import AnnotatorQueries
from store.accounts import AccountQueries
from store.evaluations import EvaluationQueries
from store.exports import ExportQueries
from store.imports import ImportQueries
from store.insights import InsightQueries
from store.moderation import ModerationQueries
from store.rewards import RewardQueries
from store.training import TrainingQueries

# Where the app, `python -m trainers.run` and `python -m store` keep their SQLite file unless told otherwise.
DEFAULT_DB = "data/playground.db"
# How long a write waits for another process's lock before giving up (the trainer holds short ones).
BUSY_TIMEOUT_MS = 5000
PAGE_CACHE_KIB = 64 * 1024

CHOICES = ("a", "b", "tie", "both_bad")
RATINGS = ("up", "down")
SLOTS = ("a", "b")
FEEDBACK_KINDS = ("choice", "rating", "edit")

REPLY_FIELDS = (
    "slot",
    "text",
    "policy_version",
    "model_id",
    "seed",
    "temperature",
    "top_p",
    "max_new_tokens",
    "finish_reason",
    "n_tokens",
    "logprob_sum",
    "latency_s",
    "ttft_s",
    "token_ids_json",
    "best_of",  # best-of-n: the best of how many samples (1 or null: a plain sample)
    "reward_model",
    "reward_score",
)


class StoreError(RuntimeError):
    """The database refused a write (locked, read-only, full, corrupt). Nothing was written."""


class FeedbackError(ValueError):
    """Feedback that cannot be recorded as given (unknown value, superseded pair...). Nothing written."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _explain(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "the database is locked by another process; try again in a moment"
    if "readonly" in text or "read-only" in text:
        return "the database is read-only"
    if "full" in text:
        return "the disk is full"
    return f"database error: {exc}"


class Store(TrainingQueries, EvaluationQueries, InsightQueries, RewardQueries, AnnotatorQueries, ExportQueries,
            ImportQueries, ModerationQueries, AccountQueries):
    def __init__(self, path: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        # A "file:...?mode=ro" URI opens read-only (the read-only test and read-only mounts use it).
        is_uri = str(path).startswith("file:")
        self.path = Path(path)
        if not is_uri and str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(path), check_same_thread=False, timeout=busy_timeout_ms / 1000, isolation_level=None, uri=is_uri
        )
        self.db = Database(conn)
        self._lock = threading.RLock()
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # SQLite's default page cache is 2 MiB; a store of 100,000 judgments is ~1 GB, and the pages a
        # vote touches (indexes, the newest turns) should stay in memory however large it grows.
        conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        try:
            # WAL lets the trainer read while the app writes; a read-only file keeps its mode.
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass
        self.migrate()

    _now = staticmethod(now)

    def migrate(self, stop_before: str | None = None) -> None:
        with self._lock:
            try:
                migrations.apply(self.db, stop_before=stop_before)
            except sqlite3.Error as exc:
                raise StoreError(f"could not migrate {self.path}: {_explain(exc)}") from exc

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    @contextmanager
    def _write(self, what: str) -> Iterator[Database]:
        with self._lock:
            try:
                with self.db.atomic():
                    yield self.db
            except sqlite3.Error as exc:
                raise StoreError(f"{what} was not saved: {_explain(exc)}") from exc

    @contextmanager
    def batch(self, what: str = "the batch") -> Iterator["Store"]:
        """Many writes as one transaction (each becomes a savepoint): all of them are saved or none.
        For bulk loads (imports, benchmarks); the chat writes one judgment at a time."""
        with self._write(what):
            yield self

    def _rows(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return [dict(r) for r in self.db.query(sql, params)]
            except sqlite3.Error as exc:
                raise StoreError(_explain(exc)) from exc

    # -- conversations and turns ------------------------------------------------------------------

    def start_conversation(self, session_id: str, user: str, model_id: str, system_prompt: str,
                           simulated: bool = False) -> int:
        with self._write("the conversation") as db:
            table = db["conversations"].insert(
                {
                    "session_id": session_id,
                    "user": user,
                    "model_id": model_id,
                    "system_prompt": system_prompt,
                    "simulated": int(simulated),
                    "created_at": now(),
                }
            )
            return int(table.last_pk)

    def record_turn(
        self,
        conversation_id: int,
        idx: int,
        context: list[dict[str, str]],
        user_message: str,
        replies: list[dict[str, Any]],
        note: str | None = None,
        prompt_tokens: int | None = None,
    ) -> tuple[int, list[int]]:
        """A user message and its first pair of replies, written together. Returns (turn_id, reply_ids).
        `prompt_tokens`: the length of the prompt the model read (gives the turn's pairs their length)."""
        _check_pair(replies)
        with self._write("the turn") as db:
            turn_id = int(
                db["turns"]
                .insert(
                    {
                        "conversation_id": conversation_id,
                        "idx": idx,
                        "context_json": json.dumps(context, ensure_ascii=False),
                        "user_message": user_message,
                        "note": note,
                        "prompt_tokens": prompt_tokens,
                        "created_at": now(),
                    }
                )
                .last_pk
            )
            return turn_id, self._insert_replies(db, turn_id, 0, replies)

    def record_regenerated_pair(self, turn_id: int, replies: list[dict[str, Any]]) -> tuple[int, list[int]]:
        """A new pair for a turn; the earlier pairs stay, marked superseded. Returns (pair, reply_ids)."""
        _check_pair(replies)
        with self._write("the new pair") as db:
            row = next(db.query("select max(pair) as p from replies where turn_id = ?", [turn_id]))
            if row["p"] is None:
                raise FeedbackError(f"turn {turn_id} has no replies to regenerate")
            pair = row["p"] + 1
            db.execute("update replies set superseded = 1 where turn_id = ?", [turn_id])
            db.execute("delete from training_pairs where turn_id = ?", [turn_id])  # regenerated away: no pairs
            return pair, self._insert_replies(db, turn_id, pair, replies)

    def _insert_replies(self, db: Database, turn_id: int, pair: int, replies: list[dict]) -> list[int]:
        ids = []
        for reply in replies:
            row = {k: reply.get(k) for k in REPLY_FIELDS}
            row.update(turn_id=turn_id, pair=pair, superseded=0, created_at=now())
            ids.append(int(db["replies"].insert(row).last_pk))
        return ids

    # -- feedback ---------------------------------------------------------------------------------

    def record_choice(self, turn_id: int, pair: int, choice: str, user: str, session_id: str) -> int:
        if choice not in CHOICES:
            raise FeedbackError(f"unknown choice {choice!r}: use one of {', '.join(CHOICES)}")
        with self._write("the vote") as db:
            self._check_live_pair(db, turn_id, pair)
            return self._insert_feedback(db, turn_id, pair, None, "choice", choice, user, session_id)

    def record_rating(self, reply_id: int, rating: str, user: str, session_id: str) -> int:
        if rating not in RATINGS:
            raise FeedbackError(f"unknown rating {rating!r}: use 'up' or 'down'")
        with self._write("the rating") as db:
            rows = list(db.query("select turn_id, pair from replies where id = ?", [reply_id]))
            if not rows:
                raise FeedbackError(f"no reply {reply_id}")
            turn_id, pair = rows[0]["turn_id"], rows[0]["pair"]
            self._check_live_pair(db, turn_id, pair)
            return self._insert_feedback(db, turn_id, pair, reply_id, "rating", rating, user, session_id)

    def record_edit(self, turn_id: int, pair: int, text: str, user: str, session_id: str,
                    n_tokens: int | None = None) -> int:
        """`n_tokens`: the better reply's length in the model's tokens, end-of-turn included (gives its
        pairs their length)."""
        if not text.strip():
            raise FeedbackError("the better reply is empty")
        with self._write("the better reply") as db:
            self._check_live_pair(db, turn_id, pair)
            return self._insert_feedback(db, turn_id, pair, None, "edit", text, user, session_id, n_tokens)

    def _check_live_pair(self, db: Database, turn_id: int, pair: int) -> None:
        rows = list(
            db.query("select superseded from replies where turn_id = ? and pair = ?", [turn_id, pair])
        )
        if not rows:
            raise FeedbackError(f"turn {turn_id} has no pair {pair}")
        if any(r["superseded"] for r in rows):
            raise FeedbackError("that pair was regenerated; judge the new pair instead")
        if self.check_not_withheld(db, turn_id, pair) is not None:
            raise FeedbackError("a reply of that pair was withheld by the moderation check; it cannot be judged")

    def _insert_feedback(
        self, db: Database, turn_id: int, pair: int, reply_id: int | None, kind: str, value: str,
        user: str, session_id: str, n_tokens: int | None = None,
    ) -> int:
        # A repeated judgment replaces the earlier one but keeps it: the old row points at the new.
        same_target = "reply_id = ?" if reply_id is not None else "reply_id is null"
        target_args = [reply_id] if reply_id is not None else []
        earlier = [
            r["id"]
            for r in db.query(
                f"select id from feedback where turn_id = ? and pair = ? and kind = ? and {same_target}"
                " and replaced_by is null",
                [turn_id, pair, kind, *target_args],
            )
        ]
        new_id = int(
            db["feedback"]
            .insert(
                {
                    "turn_id": turn_id,
                    "pair": pair,
                    "reply_id": reply_id,
                    "kind": kind,
                    "value": value,
                    "user": user,
                    "session_id": session_id,
                    "n_tokens": n_tokens,
                    "created_at": now(),
                }
            )
            .last_pk
        )
        for old in earlier:
            db.execute("update feedback set replaced_by = ? where id = ?", [new_id, old])
        self._refresh_pairs(db, turn_id, pair)
        return new_id

    def _refresh_pairs(self, db: Database, turn_id: int, pair: int) -> None:
        # The pair index follows every judgment in the same transaction (store/pairs.py has the rules).
        db.execute("delete from training_pairs where turn_id = ? and pair = ?", [turn_id, pair])
        for group in judged_groups(db, "and f.turn_id = ? and f.pair = ?", [turn_id, pair]):
            rows = index_rows(group)
            if rows:
                db["training_pairs"].insert_all(rows)

    # -- policy versions --------------------------------------------------------------------------

    def ensure_base_version(self, model_id: str) -> str:
        """Record v0 (the base model) for this model id once; returns its name."""
        with self._write("the base policy version") as db:
            db.execute(
                "insert or ignore into policy_versions (name, model_id, parent, algo, created_at)"
                " values ('v0', ?, null, 'base', ?)",
                [model_id, now()],
            )
        return "v0"

    # -- reads ------------------------------------------------------------------------------------

    def replies_for_turn(self, turn_id: int) -> list[dict[str, Any]]:
        return self._rows("select * from replies where turn_id = ? order by pair, slot", [turn_id])

    def feedback_for_turn(self, turn_id: int, current_only: bool = False) -> list[dict[str, Any]]:
        extra = " and replaced_by is null" if current_only else ""
        return self._rows(f"select * from feedback where turn_id = ?{extra} order by id", [turn_id])

    def turns_for_conversation(self, conversation_id: int) -> list[dict[str, Any]]:
        return self._rows("select * from turns where conversation_id = ? order by idx", [conversation_id])

    def conversation(self, conversation_id: int) -> dict[str, Any] | None:
        rows = self._rows("select * from conversations where id = ?", [conversation_id])
        return rows[0] if rows else None

    def conversations(self, simulated: bool | None = None) -> list[dict[str, Any]]:
        """Every conversation, oldest first; only the simulated (or only people's) when told."""
        if simulated is None:
            return self._rows("select * from conversations order by id")
        return self._rows("select * from conversations where simulated = ? order by id", [int(simulated)])

    def latest_turn(self) -> dict[str, Any] | None:
        rows = self._rows("select * from turns order by id desc limit 1")
        return rows[0] if rows else None

    def replies_by_version(self, version: str, simulated: bool | None = None) -> list[dict[str, Any]]:
        """Every reply a version wrote, oldest first; only in simulated (or people's) conversations when told."""
        where = "" if simulated is None else " and c.simulated = ?"
        return self._rows(
            "select r.* from replies r join turns t on t.id = r.turn_id join conversations c"
            f" on c.id = t.conversation_id where r.policy_version = ?{where} order by r.id",
            [version] + ([] if simulated is None else [int(simulated)]))

    def policy_versions(self, model_id: str | None = None) -> list[dict[str, Any]]:
        if model_id is None:
            return self._rows("select * from policy_versions order by id")
        return self._rows("select * from policy_versions where model_id = ? order by id", [model_id])

    def stats(self) -> dict[str, Any]:
        counts = {
            table: self._rows(f"select count(*) as n from [{table}]")[0]["n"]
            for table in ("conversations", "turns", "replies", "feedback", "training_pairs", "policy_versions",
                          "training_runs", "metrics", "live_events", "evaluations", "eval_samples", "reward_models")
        }
        by_kind = self._rows(
            "select kind, value, count(*) as n from feedback where replaced_by is null group by kind, value"
        )
        feedback = {}
        for row in by_kind:
            feedback.setdefault(row["kind"], {})[row["value"] if row["kind"] != "edit" else "text"] = row["n"]
        counts["current_feedback"] = feedback
        counts["superseded_replies"] = self._rows("select count(*) as n from replies where superseded = 1")[0]["n"]
        with self._lock:
            counts["schema"] = migrations.applied_names(self.db)
        return counts


def _check_pair(replies: list[dict[str, Any]]) -> None:
    slots = sorted(r.get("slot") for r in replies)
    if slots != list(SLOTS):
        raise ValueError(f"a pair needs one reply per slot {SLOTS}, got {slots}")
