"""Issue 15, proof under faults: the server killed (SIGKILL) during a burst of votes, then restarted on
the same database; a read-only and a full database while people chat through the API.

Covered elsewhere and re-run with these (see the report): a trainer killed mid-round
(tests/test_loop.py::test_trainer_killed_mid_round_keeps_serving_and_the_next_round_works, and with
simulated users chatting, tests/test_simulate.py), a locked database through the API
(tests/test_app_api.py::test_locked_database_vote_is_not_saved_then_saved), a read-only and a full
database at the store (tests/test_store.py::test_read_only_database_reports_and_writes_nothing,
::test_full_disk_reports_and_writes_nothing).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from bench.fixtures import free_port
from store import Store
from store.migrations import all_names
from tests.servers import running_app
from tests.test_loop import wait_for

ROOT = Path(__file__).resolve().parent.parent
FAST = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
VOTERS = 4
# Acknowledged votes before the kill: enough that every voter has several in, and the kill lands mid-burst.
ACKS_BEFORE_KILL = 40
CYCLE = ("a", "b", "tie", "both_bad")  # each voter's votes in turn: each replaces the one before
START_TIMEOUT_S = 180


class App:
    """app.py as a real separate process (SIGKILL needs one), on the tiny model, the schedule off."""

    def __init__(self, model_dir: Path, db: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workdir / f"app-{self.port}.log"
        command = [sys.executable, str(ROOT / "app.py"), "--model", str(model_dir), "--db", str(db),
                   "--port", str(self.port), "--adapters-dir", str(workdir / "adapters"), "--no-train", "--no-eval",
                   "--arena-rate", "0"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
        wait_for(self._answers, timeout=START_TIMEOUT_S, every=0.2, what=f"the app at {self.url}")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the app exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(self.url, timeout=2)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class Voter(threading.Thread):
    """One session: a pair, then votes on it back to back until the server goes away."""

    def __init__(self, url: str, k: int):
        super().__init__(daemon=True)
        self.client = Client(url, verbose=False)
        self.pair = self.client.predict(f"burst {k}", api_name="/send", **FAST)
        self.acks: list[str] = []  # the choices the app confirmed, in order
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while True:
                choice = CYCLE[len(self.acks) % len(CYCLE)]
                voted = self.client.predict(choice, api_name="/vote")
                assert (voted["turn_id"], voted["choice"]) == (self.pair["turn_id"], choice), voted
                self.acks.append(choice)
        except Exception as exc:  # noqa: BLE001 - the kill ends every voter with a connection error
            self.error = exc


class Sender(threading.Thread):
    """One session sending message after message meanwhile, so a turn's write is in flight at the kill too."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.client = Client(url, verbose=False)
        self.saved: list[dict] = []  # pairs the app said it stored
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while True:
                pair = self.client.predict(f"message {len(self.saved)}", api_name="/send", **FAST)
                assert pair["saved"], pair
                self.saved.append(pair)
        except Exception as exc:  # noqa: BLE001 - the kill ends it with a connection error
            self.error = exc


def check_turns_whole(store: Store, sender: Sender) -> None:
    """Every stored turn has both replies (a turn and its pair are one write), every acknowledged one too."""
    turns = {t["id"]: t for c in store.conversations() for t in store.turns_for_conversation(c["id"])}
    for turn_id in turns:
        assert [r["slot"] for r in store.replies_for_turn(turn_id)] == ["a", "b"]
    for pair in sender.saved:
        assert turns[pair["turn_id"]]["user_message"] == f"message {sender.saved.index(pair)}"
        assert [r["text"] for r in store.replies_for_turn(pair["turn_id"])] == [
            pair["replies"]["a"]["text"], pair["replies"]["b"]["text"]]


def check_votes_survived(store: Store, voters: list[Voter]) -> None:
    """Every acknowledged vote stored in order; at most the one in flight beyond them; each replaced by the
    next, the last in force, and the pair index matching it (no half-written judgment)."""
    pairs = store.training_pairs(store.policy_versions()[0]["model_id"], held_out=False, new=None)
    pairs += store.training_pairs(store.policy_versions()[0]["model_id"], held_out=True, new=None)
    for voter in voters:
        turn_id = voter.pair["turn_id"]
        rows = [r for r in store.feedback_for_turn(turn_id) if r["kind"] == "choice"]
        values = [r["value"] for r in rows]
        n = len(voter.acks)
        assert n <= len(rows) <= n + 1, (n, values)
        assert values == [CYCLE[i % len(CYCLE)] for i in range(len(rows))]
        assert [r["replaced_by"] for r in rows] == [r["id"] for r in rows[1:]] + [None]
        current = values[-1]
        index = [p for p in pairs if p["turn_id"] == turn_id]
        if current in ("a", "b"):
            replies = {r["slot"]: r["id"] for r in store.replies_for_turn(turn_id)}
            assert [(p["source"], p["chosen_reply_id"]) for p in index] == [("choice", replies[current])]
        else:
            assert index == []  # a tie or both-bad makes no training pair


def test_server_killed_during_a_burst_of_votes_loses_no_acknowledged_vote(tiny_model_dir, tmp_path):
    db = tmp_path / "faults.db"
    app = App(tiny_model_dir, db, tmp_path)
    try:
        voters = [Voter(app.url, k) for k in range(VOTERS)]
        sender = Sender(app.url)
        for v in [*voters, sender]:
            v.start()
        wait_for(lambda: sum(len(v.acks) for v in voters) >= ACKS_BEFORE_KILL, timeout=120, every=0.01,
                 what=f"{ACKS_BEFORE_KILL} acknowledged votes")
        app.process.send_signal(signal.SIGKILL)
        app.process.wait(timeout=30)
        for v in [*voters, sender]:
            v.join(timeout=60)
        assert not any(v.is_alive() for v in [*voters, sender]), "a client hung after the server died"
        assert all(v.error is not None for v in [*voters, sender])
    finally:
        app.stop()
    acked = sum(len(v.acks) for v in voters)
    assert acked >= ACKS_BEFORE_KILL

    # The database as the kill left it: intact, and upgraded cleanly by the command line.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as raw:
        assert raw.execute("pragma integrity_check").fetchall() == [("ok",)]
    migrate = subprocess.run([sys.executable, "-m", "store", "migrate", "--db", str(db)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    assert json.loads(migrate.stdout) == {"applied": all_names()}
    store = Store(db)
    try:
        check_votes_survived(store, voters)
        check_turns_whole(store, sender)
        stored = store.stats()["feedback"]
    finally:
        store.close()
    assert acked <= stored <= acked + VOTERS

    # The app starts again on it and goes on: a new vote lands beside the old ones.
    app = App(tiny_model_dir, db, tmp_path)
    try:
        client = Client(app.url, verbose=False)
        pair = client.predict("after the crash", api_name="/send", **FAST)
        assert client.predict("a", api_name="/vote")["choice"] == "a"
    finally:
        app.stop()
    store = Store(db)
    try:
        assert store.stats()["feedback"] == stored + 1
        assert [f["value"] for f in store.feedback_for_turn(pair["turn_id"])] == ["a"]
        check_votes_survived(store, voters)
        check_turns_whole(store, sender)
    finally:
        store.close()


@pytest.fixture
def app(tiny_loaded, tmp_path):
    with running_app(tiny_loaded, tmp_path / "api.db") as (url, service):
        yield url, service


def pragma(service, statement: str):
    """Change the app's own connection the way the fault would (no request is in flight meanwhile)."""
    return service.store.db.execute(statement).fetchall()


@pytest.mark.parametrize("fault", ["read-only", "disk is full"])
def test_a_database_that_refuses_writes_mid_run_is_said_and_loses_nothing(app, fault):
    """The vote is refused in words, earlier votes stay, and the pair made meanwhile is kept on screen and
    saved with the next vote once the database takes writes again."""
    url, service = app
    client = Client(url, verbose=False)
    earlier = client.predict("before the fault", api_name="/send", **FAST)
    client.predict("a", api_name="/vote")
    if fault == "read-only":
        # SQLite's own read-only switch: every write fails as on a read-only file or mount.
        undo = "pragma query_only = 0"
        pragma(service, "pragma query_only = 1")
    else:
        # The file may not grow: the next write that needs a page fails as on a full disk.
        undo = "pragma max_page_count = 1073741823"
        pages = pragma(service, "pragma page_count")[0][0]
        pragma(service, f"pragma max_page_count = {pages}")
    try:
        # Big texts need new pages whatever the fault (a small vote may still fit a free page of a full file).
        with pytest.raises(Exception, match=f"NOT saved.*{fault}"):
            client.predict("y" * 100_000, api_name="/edit")
        # The pair is written but cannot be stored: it stays on screen, said so.
        pending = client.predict("x" * 100_000, api_name="/send", **FAST)
        assert pending["saved"] is False and any(fault in n for n in pending["notes"]), pending["notes"]
        with pytest.raises(Exception, match=f"not saved yet.*{fault}.*Nothing was recorded"):
            client.predict("b", api_name="/vote")
    finally:
        pragma(service, undo)
    assert [(f["kind"], f["value"]) for f in service.store.feedback_for_turn(earlier["turn_id"])] == [("choice", "a")]
    saved = client.predict("b", api_name="/vote")
    assert saved["saved"] is True and saved["turn_id"] is not None and saved["notes"] == [
        n for n in pending["notes"] if "not saved" not in n]
    assert [f["value"] for f in service.store.feedback_for_turn(saved["turn_id"])] == ["b"]
    stored = next(t for t in service.store.turns_for_conversation(saved["conversation_id"])
                  if t["id"] == saved["turn_id"])
    assert stored["user_message"] == "x" * 100_000


def test_the_app_starts_when_gradios_localhost_check_would_time_out(tiny_loaded, tmp_path, monkeypatch):
    """On 2 cores busy with a training round, gradio's own check that localhost answers (one HEAD of the
    page, 3 s timeout) timed out, and gradio then refuses to start without a share link. The app never
    shares, so it skips that check: here the check always fails, and the app starts and serves anyway."""
    import gradio.networking

    asked = []

    def localhost_too_slow(url):
        asked.append(url)
        return False

    monkeypatch.setattr(gradio.networking, "url_ok", localhost_too_slow)
    with running_app(tiny_loaded, tmp_path / "slow.db") as (url, _service):
        client = Client(url, verbose=False)
        client.predict(api_name="/new_conversation")
        reply = client.predict("Hello there", api_name="/send")
    assert asked == []
    assert reply, "the started app answered nothing"
