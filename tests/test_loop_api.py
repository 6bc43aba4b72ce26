"""What the UI asks of the training loop: one status computation a second for every tab, validated and
locked settings for the next round, and the round threshold counted at the next round's length limit."""

from __future__ import annotations

import threading

import pytest

from playground.loop import LoopSettings, TrainingLoop
from playground.serving.policy import PolicyHolder
from store.pairs import is_held_out

CONTEXT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def loop(store, tiny_loaded, tmp_path):
    store.ensure_base_version(tiny_loaded.model_id)
    loop = TrainingLoop(LoopSettings(db=str(tmp_path / "test.db"), adapters_dir=str(tmp_path / "adapters"),
                                     model=tiny_loaded.model_id, model_cache=str(tmp_path / "cache"), enabled=False),
                        store, PolicyHolder(tiny_loaded))
    yield loop
    loop.shutdown()


def judge(store, model_id, n, n_tokens=(20, 30), prompt_tokens=50):
    """n voted pairs in conversations outside the held-out split."""
    made = 0
    while made < n:
        conv = store.start_conversation("s", "u", model_id, "")
        if is_held_out(conv):
            continue
        replies = [{"slot": s, "text": f"{s} {conv}", "policy_version": "v0", "model_id": model_id, "seed": 1,
                    "n_tokens": k, "finish_reason": "stop"} for s, k in zip("ab", n_tokens)]
        turn, _ = store.record_turn(conv, 0, CONTEXT, "hi", replies, prompt_tokens=prompt_tokens)
        store.record_choice(turn, 0, "a", "u", "s")
        made += 1


def test_many_tabs_polling_at_once_cost_one_status_computation(loop, monkeypatch):
    calls = []
    real = loop._compute_status
    gate = threading.Event()

    def counted():
        calls.append(1)
        gate.wait(5)  # hold the first computation until every tab has asked
        return real()

    monkeypatch.setattr(loop, "_compute_status", counted)
    results = []
    tabs = [threading.Thread(target=lambda: results.append(loop.status())) for _ in range(16)]
    for t in tabs:
        t.start()
    gate.set()
    for t in tabs:
        t.join()
    assert len(calls) == 1 and len(results) == 16
    assert all(r is results[0] for r in results)


def test_an_event_makes_the_next_status_fresh(loop):
    before = loop.status()
    loop.set_paused(True)
    assert loop.status() is not before and loop.status()["paused"] is True


def test_next_round_settings_are_validated_and_kept_apart_from_the_caller(loop):
    config = {"beta": 0.2, "epochs": 2}
    assert loop.set_next_config(config) == config
    config["beta"] = 99.0  # the caller's dict is not the loop's
    assert loop.next_config() == {"beta": 0.2, "epochs": 2}
    with pytest.raises(ValueError, match="unknown DPO settings"):
        loop.set_next_config({"betta": 0.1})
    with pytest.raises(ValueError, match="beta"):
        loop.set_next_config({"beta": -1.0})
    assert loop.next_config() == {"beta": 0.2, "epochs": 2}  # a refused change leaves the last good one


def test_the_threshold_counts_pairs_the_next_round_can_train_on(loop, store, tiny_loaded):
    judge(store, tiny_loaded.model_id, 3)
    assert loop.new_pairs() == 3 and loop.status()["new_pairs"] == 3
    loop.set_next_config({"max_length": 64})  # shorter than these pairs (50 + 30 + tail)
    assert loop.new_pairs() == 0
    assert loop.start_round(trigger="manual", min_new_pairs=1) == "0 new pair(s); a round needs 1"
    assert store.runs() == []  # no round recorded, no trainer started, nothing for it to skip


def test_runs_curves_and_versions_come_from_the_loop(loop, store, tiny_loaded):
    assert loop.versions() == ["v0"] and loop.runs() == [] and loop.curves() == (None, [])
    run = store.create_run("dpo", {}, tiny_loaded.model_id, "v0", "manual")
    assert loop.curves() == (None, [])  # a round that has logged no step has no curves yet
    store.update_run_progress(run, 1, 4, 0.69, {"loss": 0.69, "rewards/margins": 0.0})
    run_id, rows = loop.curves()
    assert run_id == run and {r["name"] for r in rows} == {"loss", "rewards/margins"}
    assert [r["id"] for r in loop.runs()] == [run]


def test_a_status_computed_across_an_event_is_not_kept(loop, monkeypatch):
    real = loop._compute_status
    before = loop.paused

    def promoted_meanwhile():
        status = real()  # reads the state before the event...
        loop.set_paused(not before)  # ...which changes while it is being computed
        return status

    monkeypatch.setattr(loop, "_compute_status", promoted_meanwhile)
    assert loop.status()["paused"] is before  # served once, as computed
    monkeypatch.setattr(loop, "_compute_status", real)
    assert loop.status()["paused"] is (not before)  # the next poll sees the event, not a stale copy
