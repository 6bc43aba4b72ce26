"""The autopilot against the real app: votes land marked simulated, a round triggers, the new version
serves; bad settings fail before anything starts; a vanished app is retried, then reported."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from playground.sim.simulate import LocalBackend, SimulationConfig, Simulator
from tests.servers import running_app
from tests.test_loop import loop_settings, wait_for

ROOT = Path(__file__).resolve().parent.parent


def simulator_for(url, **overrides):
    from playground.sim.simulate import HttpBackend

    config = SimulationConfig(**{"gold": "concise", "users": 2, "turns": 8, "max_new_tokens": 8, "retries": 2,
                                 **overrides})
    lines = []
    return Simulator(config, lambda: HttpBackend(url), report=lines.append), lines


def pause_once_a_round_starts(loop, done: threading.Event) -> None:
    """Let exactly one round train: pause the schedule as soon as it starts (it still finishes and goes live)."""
    while not done.is_set():
        if loop.store.running_run() is not None:
            loop.set_paused(True)
            return
        done.wait(0.05)


def test_autopilot_votes_land_marked_simulated_and_the_new_version_serves(tiny_loaded, tmp_path):
    settings = loop_settings(tmp_path, min_new_pairs=4)
    # A taste that never ties on different replies, so the 8 votes make the 4 pairs the round needs whatever
    # the sampled replies are (with `concise` most of the tiny model's replies tie: once 5 of 8 did, and no
    # round came).
    gold = {"gold": "tests.gold_example:characters"}
    with running_app(tiny_loaded, tmp_path / "sim.db", loop_settings=settings) as (url, service, loop):
        # The pairs left after round 1 (edits give two each; votes that land after it read its data) can
        # reach the threshold, and the loop starts the next round the moment v1 goes live: unpaused, the
        # later run below would meet v1 or v2 by timing. One round, then the schedule stays paused.
        done = threading.Event()
        one_round = threading.Thread(target=pause_once_a_round_starts, args=(loop, done), daemon=True)
        one_round.start()
        simulator, lines = simulator_for(url, edit_rate=0.5, **gold)
        summary = simulator.run()
        assert summary["votes"] == 8 and summary["stopped_because"] is None
        stats = service.store.stats()
        assert stats["current_feedback"]["choice"] and sum(stats["current_feedback"]["choice"].values()) == 8
        users = {(c["user"], c["simulated"]) for c in service.store.conversations()}
        assert sorted(users) == [("sim-characters-0", 1), ("sim-characters-1", 1)]
        assert any(line.startswith("votes ") and "words)" in line for line in lines)
        # The per-version length the room watches: the mean word count of the pairs the autopilot judged.
        replies = [r["text"] for r in service.store.replies_by_version("v0", simulated=True)]
        from playground.sim.gold import count_words
        assert summary["gold_by_version"]["v0"]["mean_words"] == pytest.approx(
            sum(count_words(text) for text in replies) / len(replies), abs=0.05)

        # Wait for what the later run reads, the loop's status (cached up to a second), not the policy.
        wait_for(lambda: (s := loop.status())["live"] == "v1" and s["running"] is None and s["paused"],
                 what="the autopilot's votes to train v1")
        done.set()
        one_round.join(timeout=5)
        later, lines = simulator_for(url, turns=4, seed=5, **gold)
        summary = later.run()
        assert set(summary["gold_by_version"]) == {"v1"} and summary["votes"] == 4 and summary["live"] == "v1"
        progress = [line for line in lines if line.startswith("votes ")]
        assert progress and all(" · live v1 · " in line for line in progress), lines
        assert [r["version"] for r in service.store.runs() if r["status"] == "succeeded"] == ["v1"]


class ScriptedStatus:
    """A backend whose app reports the given statuses in turn (the last one from then on)."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.pair = None

    def training_status(self):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def new_conversation(self, user, simulated):
        return {"pair": None}

    def send(self, message, max_new_tokens):
        version = self.training_status()["live"]
        self.pair = {"turn_id": 1, "pair": 0, "choice": None,
                     "replies": {s: {"text": text, "policy_version": version}
                                 for s, text in (("a", "Yes."), ("b", "Yes, and at some length."))}}
        return self.pair

    def vote(self, choice):
        self.pair["choice"] = choice
        return self.pair

    def edit(self, text):
        return self.pair

    def state(self):
        return self.pair


def test_every_version_that_goes_live_while_the_users_wait_is_named(monkeypatch):
    """Round 1 ends and round 2 starts at once on the pairs left over: v1 was live between two progress
    lines, and the simulator still says so when it sees it."""
    import playground.sim.simulate as simulate

    monkeypatch.setattr(simulate, "ROUND_POLL_S", 0.01)
    statuses = [{"live": "v0", "running": {"run_id": 1}}, {"live": "v0", "running": {"run_id": 1}},
                {"live": "v1", "running": {"run_id": 2}}, {"live": "v2", "running": None}]
    lines = []
    config = SimulationConfig(gold="concise", users=1, turns=1, max_new_tokens=8, edit_rate=0.0)
    backend = ScriptedStatus(statuses)
    summary = Simulator(config, lambda: backend, report=lines.append).run()
    assert lines[:4] == ["round 1 is training: the simulated users wait for it", "v1 is live",
                         "round 2 is training: the simulated users wait for it", "v2 is live"]
    assert summary["votes"] == 1 and set(summary["gold_by_version"]) == {"v2"} and summary["live"] == "v2"


@pytest.mark.parametrize("args, message", [
    (["--gold", "brevity"], "unknown gold"),
    (["--gold", "no_such_module:fn"], "import"),
    (["--prompts", "/nonexistent/prompts.txt"], "prompts.txt"),
    (["--users", "0"], "at least 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be from 1"),
    (["--max-new-tokens", "99999"], "max_new_tokens must be from 1"),
])
def test_bad_settings_fail_before_anything_starts(args, message):
    out = subprocess.run([sys.executable, "-m", "playground.sim.simulate", "--url", "http://127.0.0.1:9", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and message.lower() in out.stderr.lower()


def test_an_empty_prompt_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    out = subprocess.run([sys.executable, "-m", "playground.sim.simulate", "--prompts", str(empty)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "empty.txt" in out.stderr


def test_no_app_listening_is_said_plainly():
    out = subprocess.run([sys.executable, "-m", "playground.sim.simulate", "--url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "no app answers" in out.stderr


def test_the_app_going_away_is_retried_then_reported(tiny_loaded, tmp_path):
    with running_app(tiny_loaded, tmp_path / "gone.db") as (url, service):
        simulator, _ = simulator_for(url, turns=10_000, users=1)
        thread = threading.Thread(target=lambda: simulator.run(), daemon=True)
        thread.start()
        wait_for(lambda: simulator.progress.votes >= 3, what="a few votes")
    # The server is closed here; the simulator backs off (1 s, 2 s), then stops and says so.
    thread.join(timeout=60)
    assert not thread.is_alive()
    reason = simulator.progress.stopped_because
    assert "stopped answering" in reason and f"{simulator.progress.votes} vote(s) landed" in reason


class LostAnswers(LocalBackend):
    """A real session whose first vote lands but whose answer never comes back (a dropped connection)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dropped = False

    def vote(self, choice):
        result = super().vote(choice)
        if not self.dropped:
            self.dropped = True
            raise ConnectionError("the answer was lost")
        return result


def test_a_vote_whose_answer_was_lost_is_not_sent_twice(tiny_loaded, tmp_path):
    from playground.chat import ChatService
    from playground.serving.policy import PolicyHolder
    from store import Store

    store = Store(tmp_path / "lost.db")
    service = ChatService(PolicyHolder(tiny_loaded), store)
    config = SimulationConfig(gold="concise", users=1, turns=3, max_new_tokens=8, retries=2, edit_rate=0.0)
    summary = Simulator(config, lambda: LostAnswers(service), report=lambda line: None).run()
    assert summary["votes"] == 3
    assert store.stats()["feedback"] == 3  # one row per pair: the lost answer was checked, not re-sent
    store.close()


def test_simulated_users_wait_while_a_round_trains_then_carry_on(tiny_loaded, tmp_path):
    import os
    import signal

    settings = loop_settings(tmp_path, enabled=False)
    with running_app(tiny_loaded, tmp_path / "wait.db", loop_settings=settings) as (url, service, loop):
        # A taste that never ties on different replies: with `concise` both warm-up votes were once ties (the
        # tiny model's 8-token replies often have as many words), no pair, and train_now started no round.
        warm_up, _ = simulator_for(url, users=1, turns=2, wait_for_rounds=False,
                                   gold="tests.gold_example:characters")
        assert warm_up.run()["votes"] == 2
        assert loop.new_pairs() >= 1  # pairs for a round to train on
        loop.settings.next_config = {"epochs": 500}  # a round that runs until it is killed
        assert loop.train_now().startswith("round")
        running = wait_for(lambda: loop.store.running_run(), what="the round to start")

        simulator, lines = simulator_for(url, turns=2)
        thread = threading.Thread(target=simulator.run, daemon=True)
        thread.start()
        wait_for(lambda: any("is training" in line for line in lines), timeout=30, what="the users to wait")
        time.sleep(2.0)
        assert simulator.progress.votes == 0 and simulator.progress.turns == 0  # nobody chats meanwhile

        os.kill(running["pid"], signal.SIGKILL)  # the round ends (failed): the users carry on
        thread.join(timeout=120)
        assert not thread.is_alive() and simulator.progress.votes == 2
