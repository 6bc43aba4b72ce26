"""The staleness a round records about its training pairs (who sampled them, how far from the version
trained from), and arena votes kept out of training unless the round is told to include them.

Rounds run for real on the tiny model, in-process (`trainers.run.run_round`, what the CLI runs)."""

from __future__ import annotations

import copy
import json
import math

import pytest

from playground.loop import LoopSettings, TrainingLoop
from playground.serving.policy import PolicyHolder
from store import Store
from trainers.data import build_round, is_held_out
from trainers.dpo import score_pairs
from trainers.run import parse_args, run_round

# A few fast steps; float32 products, so the test's own scoring matches the round's to float rounding.
CONFIG = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8,
          "matmul_dtype": "float32"}


def judged(store, model_id, name, versions=("v0", "v0"), temperature=1.0, top_p=1.0, choice="a", edit=None):
    """A turn whose two replies were sampled with these settings and stored log-probs, then judged."""
    conv = store.start_conversation(name, "u", model_id, "")
    context = [{"role": "user", "content": f"tell me about {name}"}]
    rows = [{"slot": slot, "text": f"{name} reply {slot}", "policy_version": version, "model_id": model_id,
             "seed": i, "temperature": temperature, "top_p": top_p, "max_new_tokens": 8, "finish_reason": "stop",
             "n_tokens": 4, "logprob_sum": -6.0 - i - len(name) / 10, "latency_s": 0.1}
            for i, (slot, version) in enumerate(zip("ab", versions))]
    turn_id, _ = store.record_turn(conv, 0, context, context[0]["content"], rows)
    if choice is not None:
        store.record_choice(turn_id, 0, choice, "u", "s")
    if edit is not None:
        store.record_edit(turn_id, 0, edit, "u", "s")
    return conv


def training(convs):
    return [c for c in convs if not is_held_out(c)]


def round_args(tmp_path, model_dir, *extra):
    return parse_args(["--db", str(tmp_path / "round.db"), "--adapters-dir", str(tmp_path / "adapters"),
                       "--model", str(model_dir), "--config", json.dumps(CONFIG), "--no-progress", *extra])


def staleness_of(store, summary):
    return json.loads(store.run(summary["run_id"])["metrics_json"])["staleness"]


def test_a_round_from_v1_records_the_staleness_of_its_v0_and_v1_pairs(tiny_loaded, tiny_model_dir, tmp_path):
    from peft import PeftModel

    model_id = tiny_loaded.model_id
    store = Store(tmp_path / "round.db")
    first = [judged(store, model_id, f"first{i}") for i in range(16)]
    code, summary = run_round(round_args(tmp_path, tiny_model_dir))
    assert code == 0 and summary["version"] == "v1", summary
    # The round from v0 on v0's own pairs: nothing is older than what it trains from.
    fresh = staleness_of(store, summary)
    assert math.isfinite(fresh.pop("off_policy_gap"))
    assert fresh == {"n": len(training(first)), "share_older": 0.0, "mean_lag": 0.0,
                     "n_gap": 2 * len(training(first)), "by_version": {"v0": len(training(first))}}
    store.record_live(model_id, "v1", "promote")

    # v1 is live. Late v0 pairs (sampled before the swap; top_p unrecorded counts as none), and v1's pairs
    # at T=1, at T=0.7 and at top_p 0.9 (no gap: their stored log-prob is not the sampling distribution's),
    # and better replies written against v1's pair (one gap each: the person's text has no sampler).
    late_v0 = [judged(store, model_id, f"late{i}", top_p=None) for i in range(3)]
    v1_exact = [judged(store, model_id, f"exact{i}", ("v1", "v1"), choice="b") for i in range(4)]
    v1_cool = [judged(store, model_id, f"cool{i}", ("v1", "v1"), temperature=0.7) for i in range(3)]
    v1_top_p = [judged(store, model_id, f"nucleus{i}", ("v1", "v1"), top_p=0.9) for i in range(2)]
    v1_edit = [judged(store, model_id, f"edit{i}", ("v1", "v1"), choice=None, edit=f"my answer {i}")
               for i in range(2)]

    # By hand: every new pair, then as many of round 1's (all v0) replayed (replay ratio 1).
    new_v0 = len(training(late_v0))
    new_v1 = len(training(v1_exact)) + len(training(v1_cool)) + len(training(v1_top_p)) + 2 * len(training(v1_edit))
    replayed = min(len(training(first)), new_v0 + new_v1)
    n = new_v0 + new_v1 + replayed
    older = new_v0 + replayed
    n_gap = 2 * (replayed + new_v0 + len(training(v1_exact))) + 2 * len(training(v1_edit))
    assert new_v1 and new_v0 and n_gap < 2 * n

    # The gap, computed here on its own: the round's pairs (built the same way, before it consumes them)
    # scored under v1 as saved, against the stored log-probs of the T=1, top_p 1 replies only.
    data = build_round(store, tiny_loaded.tokenizer, model_id, 1024, 1.0, 0)
    v1 = PeftModel.from_pretrained(copy.deepcopy(tiny_loaded.model), str(tmp_path / "adapters" / "v1")).eval()
    pad = tiny_loaded.model.config.eos_token_id
    under = {"v1": score_pairs(v1, data.train, pad), "v0": score_pairs(tiny_loaded.model, data.train, pad)}
    stored = {c: s.logprob_sum for c, s in data.sampling.items() if s.exact}
    gaps = {name: [stored[reply] - logps[side][i].item()
                   for i, pair in enumerate(data.train)
                   for side, reply in enumerate((pair.chosen_reply_id, pair.rejected_reply_id)) if reply in stored]
            for name, logps in under.items()}
    assert len(gaps["v1"]) == n_gap

    code, summary = run_round(round_args(tmp_path, tiny_model_dir))
    assert code == 0 and summary["version"] == "v2" and summary["parent"] == "v1", summary
    staleness = staleness_of(store, summary)
    assert set(staleness) == {"n", "share_older", "mean_lag", "off_policy_gap", "n_gap", "by_version"}
    assert staleness["n"] == n == summary["n_pairs"]
    assert staleness["share_older"] == pytest.approx(older / n)
    assert staleness["mean_lag"] == pytest.approx(older / n)  # every older pair is one version behind
    assert staleness["by_version"] == {"v0": older, "v1": n - older}
    assert staleness["n_gap"] == n_gap
    assert math.isfinite(staleness["off_policy_gap"])
    expected = sum(gaps["v1"]) / n_gap
    assert staleness["off_policy_gap"] == pytest.approx(expected, abs=1e-3)
    # Scored under the version trained from (v1), not the base model.
    assert abs(sum(gaps["v0"]) / n_gap - expected) > 1e-2
    store.close()


def test_arena_pairs_train_only_with_include_arena(tiny_loaded, tiny_model_dir, tmp_path):
    model_id = tiny_loaded.model_id
    store = Store(tmp_path / "round.db")
    arena = [judged(store, model_id, f"arena{i}", ("v1", "v0"), choice="ab"[i % 2]) for i in range(8)]
    code, summary = run_round(round_args(tmp_path, tiny_model_dir))
    assert code == 0 and summary["status"] == "skipped" and "0 new training pair(s)" in summary["reason"]

    code, summary = run_round(round_args(tmp_path, tiny_model_dir, "--include-arena"))
    assert code == 0 and summary["status"] == "succeeded", summary
    staleness = staleness_of(store, summary)
    assert staleness["by_version"] == {"v1|v0": len(training(arena))} and staleness["n"] == len(training(arena))
    store.close()


def test_the_loop_counts_and_trains_arena_pairs_only_when_set(tiny_loaded, tmp_path, monkeypatch):
    import playground.loop

    store = Store(tmp_path / "loop.db")
    plain = len(training([judged(store, tiny_loaded.model_id, "plain")]))
    arena = [judged(store, tiny_loaded.model_id, f"arena{i}", ("v1", "v0")) for i in range(4)]
    commands = []

    def no_trainer(command, **kwargs):  # the command line is what is checked; no round runs
        commands.append(command)
        raise OSError("not in this test")

    monkeypatch.setattr(playground.loop.subprocess, "Popen", no_trainer)
    for include_arena in (False, True):
        settings = LoopSettings(db=str(tmp_path / "loop.db"), adapters_dir=str(tmp_path / "adapters"),
                                model=tiny_loaded.model_id, model_cache=str(tmp_path / "cache"), enabled=False,
                                include_arena=include_arena)
        loop = TrainingLoop(settings, store, PolicyHolder(tiny_loaded))
        assert loop.new_pairs() == plain + include_arena * len(training(arena))
        loop.start_round("manual", min_new_pairs=0)
        assert ("--include-arena" in commands[-1]) is include_arena
    store.close()
