"""The live loop end to end on the tiny model: scheduled rounds in a subprocess, hot-swap, rollback,
a killed trainer, corrupt adapters, and the runner's skip and failure reasons."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from playground.serving.adapters import AdapterError
from playground.chat import ChatSession
from playground.serving.generation import SamplingSettings
from playground.loop import INTERRUPTED, LoopSettings, TrainingLoop
from playground.serving.policy import PolicyHolder
from store import Store
from tests.servers import running_app
from trainers.data import count_new_pairs, is_held_out

ROOT = Path(__file__).resolve().parent.parent
FAST = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
ROUND_TIMEOUT_S = 300  # a bound for a loaded machine: the waits end when the state is reached


def wait_for(predicate, timeout=ROUND_TIMEOUT_S, every=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def stop_outside_a_write(pid: int, db_path, attempts: int = 200) -> None:
    """SIGSTOP the trainer at a moment it holds no write lock on the database: stopped inside its write of a
    step's metrics it would lock every vote out (a fresh-clone run under load once stopped it there)."""
    for _ in range(attempts):
        os.kill(pid, signal.SIGSTOP)
        probe = sqlite3.connect(str(db_path), timeout=0)
        try:
            probe.execute("begin immediate")  # takes the write lock only if nobody holds it
            probe.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)  # inside a write: let it finish, and stop it again
            time.sleep(0.02)
        finally:
            probe.close()
    raise AssertionError(f"the trainer held the database's write lock at each of {attempts} stops")


def vote_in_new_conversations(client, n, choice="a"):
    """n votes, each in a new conversation; returns the pairs voted on (as /send returned them)."""
    pairs = []
    for i in range(n):
        client.predict(api_name="/new_conversation")
        pairs.append(client.predict(f"question number {i}", api_name="/send", **FAST))
        client.predict(choice, api_name="/vote")
    return pairs


def training_pairs_made(pairs, choice) -> int:
    """The training pairs these votes make by the store's rules, counted here on their own: a vote on two
    different replies is a pair, unless its conversation is in the held-out 10%."""
    return sum(1 for p in pairs if not is_held_out(p["conversation_id"])
               and p["replies"]["a"]["text"] != p["replies"]["b"]["text"] and p["replies"][choice]["text"].strip())


def loop_settings(tmp_path, **overrides):
    settings = dict(adapters_dir=str(tmp_path / "adapters"), model_cache=str(tmp_path / "cache"), device="cpu",
                    train_every_min=0.02, min_new_pairs=4, enabled=True)
    settings.update(overrides)
    return settings


def test_a_scheduled_round_goes_live_and_rollback_returns_v0(tiny_loaded, tmp_path):
    with running_app(tiny_loaded, tmp_path / "loop.db", loop_settings=loop_settings(tmp_path)) as (url, service, loop):
        client = Client(url, verbose=False)
        # Paused while the first 8 land, so the round starts on all of them.
        client.predict(api_name="/pause")
        loop.set_next_config({"epochs": 30})
        vote_in_new_conversations(client, 8)
        client.predict(api_name="/resume")
        # Once the round has taken a step it has read its pairs: votes from now on are not in it. The
        # trainer is stopped (SIGSTOP) while the 3 late votes land, so they land while it trains however
        # fast the machine is, then it goes on.
        run = wait_for(lambda: (runs := service.store.runs(1)) and runs[0]["step"] and runs[0]["pid"] and runs[0],
                       what="the round's first step")
        stop_outside_a_write(run["pid"], tmp_path / "loop.db")
        try:
            late_pairs = vote_in_new_conversations(client, 3, choice="b")
            assert service.store.running_run() is not None  # they landed while the round trained
        finally:
            os.kill(run["pid"], signal.SIGCONT)
        status = wait_for(lambda: (s := client.predict(api_name="/training_status"))["live"] == "v1" and s,
                          what="v1 to go live")
        assert status["live"] == "v1"

        reply = client.predict("after the swap", api_name="/send", **FAST)
        assert {r["policy_version"] for r in reply["replies"].values()} == {"v1"}
        stored = service.store.replies_for_turn(reply["turn_id"])
        assert {r["policy_version"] for r in stored} == {"v1"}

        run = [r for r in service.store.runs() if r["status"] == "succeeded"][0]
        assert run["version"] == "v1" and run["trigger"] == "schedule" and run["n_pairs"] >= 4
        assert run["step"] == run["total_steps"] and run["loss"] is not None
        names = {m["name"] for m in service.store.metrics_for_run(run["id"])}
        assert {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm",
                "learning_rate"} <= names
        manifest = json.loads(service.store.version(service.policy.model_id, "v1")["manifest_json"])
        assert manifest["parent"] == "v0" and manifest["algo"] == "dpo" and manifest["data"]["train"] == run["n_pairs"]
        assert (tmp_path / "adapters" / "v1" / "adapter_model.safetensors").is_file()
        assert service.store.stats()["feedback"] == 8 + 3 + 0  # every vote kept
        # The late votes were not consumed by the round: each of their pairs waits for the next one.
        late = training_pairs_made(late_pairs, "b")
        assert late > 0  # (else consuming them would go unnoticed)
        assert count_new_pairs(service.store, service.policy.model_id) == late

        assert "v0 is live" in client.predict("v0", api_name="/rollback")
        reply = client.predict("after the rollback", api_name="/send", **FAST)
        assert {r["policy_version"] for r in reply["replies"].values()} == {"v0"}
        actions = [(e["version"], e["action"]) for e in service.store.live_events(service.policy.model_id)]
        assert actions[-2:] == [("v1", "promote"), ("v0", "rollback")]
        assert service.store.version(service.policy.model_id, "v1") is not None  # nothing deleted


@pytest.fixture
def manual_loop(tiny_loaded, tmp_path):
    """A loop with the schedule off, around a store that has 8 judged pairs."""
    store = Store(tmp_path / "manual.db")
    store.ensure_base_version(tiny_loaded.model_id)
    policy = PolicyHolder(tiny_loaded)
    loop = TrainingLoop(LoopSettings(db=str(tmp_path / "manual.db"), model=tiny_loaded.model_id,
                                     **loop_settings(tmp_path, enabled=False)), store, policy)
    loop.start()
    from playground.chat import ChatService

    service = ChatService(policy, store)
    for i in range(8):
        session = ChatSession()
        *_, pair = service.send(session, f"q{i}", SamplingSettings(**FAST))
        service.vote(session, "a")
    yield loop, service
    loop.shutdown()
    store.close()


def wait_round(loop, run_id=None):
    def done():
        runs = loop.store.runs(1)
        return runs and runs[0]["status"] != "running" and runs[0]
    run = wait_for(done, what="the round to end")
    if run["status"] == "succeeded":
        wait_for(lambda: loop.policy.snapshot().version == run["version"], what="the swap")
    return run


def test_a_swap_never_cuts_a_reply_that_is_streaming(manual_loop):
    loop, service = manual_loop
    streaming = ChatSession()
    stream = service.send(streaming, "a long answer please", SamplingSettings(max_new_tokens=64, temperature=1.0))
    first = next(stream)
    assert first.generating and first.version == "v0"
    assert loop.train_now().startswith("round")
    run = wait_round(loop)
    assert run["status"] == "succeeded" and loop.policy.snapshot().version == "v1"
    *_, finished = stream  # the stream goes on after the swap, on the version it started with
    assert not finished.generating and finished.version == "v0"
    assert all(r.finish_reason for r in finished.replies)
    assert {r["policy_version"] for r in service.store.replies_for_turn(finished.turn_id)} == {"v0"}
    *_, after = service.send(streaming, "next", SamplingSettings(**FAST))
    assert after.version == "v1"
    assert loop.last_swap_s is not None


def test_trainer_killed_mid_round_keeps_serving_and_the_next_round_works(manual_loop, tmp_path):
    loop, service = manual_loop
    loop.settings.next_config = {"epochs": 500}  # long enough to be killed mid-way
    assert loop.train_now().startswith("round")
    running = wait_for(lambda: (r := loop.store.running_run()) and (r["step"] or 0) >= 1 and r,
                       what="the round's first step")
    os.kill(running["pid"], signal.SIGKILL)
    run = wait_round(loop)
    assert run["status"] == "failed" and "signal 9" in run["reason"]
    assert loop.policy.snapshot().version == "v0"  # still serving
    assert not (tmp_path / "adapters" / "v1").exists()
    *_, pair = service.send(ChatSession(), "still there?", SamplingSettings(**FAST))
    assert pair.version == "v0" and pair.reply_ids

    loop.settings.next_config = {}
    loop.train_now()
    run = wait_round(loop)
    assert run["status"] == "succeeded" and run["version"] == "v1"
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["v1"]  # no half-written folder left


def test_corrupt_or_foreign_adapters_are_refused_and_the_live_version_stays(manual_loop, tmp_path):
    loop, service = manual_loop
    loop.train_now()
    assert wait_round(loop)["status"] == "succeeded"
    loop.rollback("v0")
    weights = tmp_path / "adapters" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        loop.promote("v1")
    assert loop.policy.snapshot().version == "v0"
    with pytest.raises(AdapterError, match="no version v9"):
        loop.promote("v9")
    assert service.store.live_version(service.policy.model_id) == "v0"


def test_a_round_left_running_by_a_crash_is_marked_failed_at_start(tiny_loaded, tmp_path):
    store = Store(tmp_path / "crash.db")
    run_id = store.create_run("dpo", {}, tiny_loaded.model_id, "v0", "schedule")
    loop = TrainingLoop(LoopSettings(db=str(tmp_path / "crash.db"), model=tiny_loaded.model_id,
                                     **loop_settings(tmp_path, enabled=False)), store, PolicyHolder(tiny_loaded))
    loop.start()
    assert store.run(run_id)["status"] == "failed" and store.run(run_id)["reason"] == INTERRUPTED
    loop.shutdown()
    store.close()


def run_cli(tmp_path, model_dir, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "trainers.run", "--db", str(tmp_path / "cli.db"), "--adapters-dir",
         str(tmp_path / "adapters"), "--model", str(model_dir), "--no-progress", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=ROUND_TIMEOUT_S)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


def judged_store(tmp_path, loaded, n, choice):
    from playground.chat import ChatService

    store = Store(tmp_path / "cli.db")
    service = ChatService(PolicyHolder(loaded), store)
    for i in range(n):
        session = ChatSession()
        list(service.send(session, f"q{i}", SamplingSettings(**FAST)))
        service.vote(session, choice)
    store.close()


def test_runner_skips_with_a_reason_when_there_is_too_little_to_learn(tiny_loaded, tiny_model_dir, tmp_path):
    judged_store(tmp_path, tiny_loaded, 5, "tie")
    code, out = run_cli(tmp_path, tiny_model_dir)
    assert code == 0 and out["status"] == "skipped" and "0 new training pair(s)" in out["reason"]
    judged_store(tmp_path, tiny_loaded, 2, "a")
    code, out = run_cli(tmp_path, tiny_model_dir, "--min-new-pairs", "16")
    assert code == 0 and out["status"] == "skipped" and "fewer than the 16 needed" in out["reason"]
    code, out = run_cli(tmp_path, tiny_model_dir, "--config", '{"max_length": 8}')
    assert out["status"] == "skipped" and "too_long" in out["reason"]
    assert not (tmp_path / "adapters" / "v1").exists()


def test_runner_stops_a_diverging_round_and_serves_nothing(tiny_loaded, tiny_model_dir, tmp_path):
    judged_store(tmp_path, tiny_loaded, 6, "a")
    code, out = run_cli(tmp_path, tiny_model_dir, "--config", '{"max_grad_norm_abort": 1e-12}')
    assert code == 1 and out["status"] == "failed" and "gradient norm" in out["reason"]
    store = Store(tmp_path / "cli.db")
    assert store.run(out["run_id"])["status"] == "failed"
    assert store.policy_versions(tiny_loaded.model_id)[-1]["name"] == "v0"
    assert not any((tmp_path / "adapters").glob("v*"))
    store.close()


def test_the_vote_that_reaches_the_threshold_starts_the_round_at_once(tiny_loaded, tmp_path):
    # The schedule ticks once an hour here: only the nudge from the fourth vote can start this round.
    settings = loop_settings(tmp_path, train_every_min=60)
    with running_app(tiny_loaded, tmp_path / "nudge.db", loop_settings=settings) as (url, service, loop):
        client = Client(url, verbose=False)
        vote_in_new_conversations(client, 3)
        time.sleep(1.0)
        assert service.store.runs() == []  # 3 of 4 pairs: the nudges ran the check, which waited
        loop.set_paused(True)
        vote_in_new_conversations(client, 1)
        time.sleep(1.0)
        assert service.store.runs() == []  # paused: a vote does not start a round
        loop.set_paused(False)
        vote_in_new_conversations(client, 1)
        run = wait_for(lambda: service.store.runs(1), timeout=10, what="the nudged round to start")[0]
        assert run["trigger"] == "schedule"
        status = wait_for(lambda: (s := client.predict(api_name="/training_status"))["live"] == "v1" and s,
                          what="v1 to go live")
        # The next check is an hour after the nudge, not at once again.
        next_check = datetime.datetime.fromisoformat(status["next_check"])
        assert (next_check - datetime.datetime.now(datetime.timezone.utc)).total_seconds() > 50 * 60
