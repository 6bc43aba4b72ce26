"""The classic path through the runner and the app: a reward-model round, a PPO round against it that
publishes a version, the refusals (too few pairs, a reward model at chance), and a scheduled PPO round
that goes live.

Rounds run for real on the tiny model: in-process through `trainers.run.run_round` (what the CLI
runs), and through the app's schedule as a subprocess."""

from __future__ import annotations

import json
import random

import pytest
from gradio_client import Client

from store import Store
from tests.servers import running_app
from tests.test_loop import FAST as FAST_SAMPLING
from tests.test_loop import loop_settings, vote_in_new_conversations, wait_for
from trainers.data import is_held_out
from trainers.run import parse_args, run_round

# The 64-wide random test model needs a larger step than SmolLM2 (tests/test_reward.py); float32 products.
REWARD = {"learning_rate": 3e-3, "lora_r": 4, "lora_alpha": 8, "epochs": 2, "matmul_dtype": "float32"}
PPO = {"iterations": 2, "rollouts_per_iteration": 4, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8,
       "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "matmul_dtype": "float32"}
MARKER = "zebra"


def marked_store(path, model_id, n, seed=0, learnable=True):
    """n conversations of one judged turn each: the chosen reply holds MARKER, the rejected one never does
    (or, learnable=False, the vote is a coin flip between two replies alike in every way)."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "table", "light"]
    store = Store(path)
    for i in range(n):
        conv = store.start_conversation(f"s{i}", "u", model_id, "")
        context = [{"role": "user", "content": f"say something about {rng.choice(words)} {i}"}]
        plain = " ".join(rng.choice(words) for _ in range(4))
        other = " ".join(rng.choice(words) for _ in range(4))
        texts = (f"{plain} {MARKER}", other) if learnable else (plain, other)
        if rng.random() < 0.5:
            texts, choice = texts[::-1], "b"
        else:
            choice = "a"
        if not learnable:
            choice = rng.choice("ab")
        rows = [{"slot": slot, "text": text, "policy_version": "v0", "model_id": model_id, "seed": k,
                 "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "finish_reason": "stop", "n_tokens": 5,
                 "logprob_sum": -5.0, "latency_s": 0.1} for k, (slot, text) in enumerate(zip("ab", texts))]
        turn_id, _ = store.record_turn(conv, 0, context, context[0]["content"], rows)
        store.record_choice(turn_id, 0, choice, "u", f"s{i}")
    return store


def runner(tmp_path, model_dir, algo, *extra, config=None):
    return parse_args(["--algo", algo, "--db", str(tmp_path / "round.db"), "--adapters-dir", str(tmp_path / "adapters"),
                       "--reward-models-dir", str(tmp_path / "reward_models"), "--model", str(model_dir),
                       "--config", json.dumps(config if config is not None else (REWARD if algo == "reward" else PPO)),
                       "--reward-config", json.dumps(REWARD), "--no-progress", *extra])


def test_a_reward_round_then_a_ppo_round_publish_a_reward_model_and_a_version(tiny_loaded, tiny_model_dir, tmp_path):
    model_id = tiny_loaded.model_id
    store = marked_store(tmp_path / "round.db", model_id, 120)
    code, summary = run_round(runner(tmp_path, tiny_model_dir, "reward"))
    assert code == 0 and summary["status"] == "succeeded", summary
    assert summary["reward_model"] == "r1" and summary.get("version") is None  # no policy version
    row = store.reward_model(model_id, "r1")
    held_out = sum(1 for c in store.conversations() if is_held_out(c["id"]))
    assert row["held_out_n"] == held_out > 0 and row["n_pairs"] == 120 - held_out
    assert row["usable"] == 1 and row["held_out_ci_low"] > 0.5, row  # the marker is learnable
    assert row["reward_std"] > 0 and (tmp_path / "reward_models" / "r1" / "score_head.safetensors").is_file()
    names = {m["name"] for m in store.metrics_for_run(summary["run_id"])}
    assert {"rm/loss", "rm/accuracy", "rm/margin"} <= names
    # A reward round consumes no pairs: the DPO schedule still sees every one as new.
    assert store.count_new_pairs(model_id) == 120 - held_out

    # PPO: no new pairs since r1, so r1 is reused; the round publishes v1 as a DPO round would.
    code, summary = run_round(runner(tmp_path, tiny_model_dir, "ppo", "--min-new-pairs", "16"))
    assert code == 0 and summary["status"] == "succeeded", summary
    assert summary["version"] == "v1" and summary["reward_model"] == "r1"
    run = store.run(summary["run_id"])
    assert run["algo"] == "ppo" and run["reward_model"] == "r1"
    metrics = json.loads(run["metrics_json"])
    assert metrics["reward_model"]["chosen"] == "reused" and metrics["prompts"] > 0
    curves = {m["name"] for m in store.metrics_for_run(run["id"])}
    assert {"score/mean", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss"} <= curves
    version = store.version(model_id, "v1")
    assert version["algo"] == "ppo" and json.loads(version["manifest_json"])["reward_model"] == "r1"
    assert (tmp_path / "adapters" / "v1" / "adapter_model.safetensors").is_file()
    assert store.count_new_pairs(model_id) == 0  # the pairs r1 was fitted to are consumed

    # Named, a reward model is used; a PPO round from v1 warm-starts from its adapter.
    store.record_live(model_id, "v1", "promote")
    code, summary = run_round(runner(tmp_path, tiny_model_dir, "ppo", "--reward-model", "r1"))
    assert summary["status"] == "succeeded" and summary["parent"] == "v1" and summary["version"] == "v2", summary


def test_ppo_refuses_a_reward_model_at_chance_unless_it_is_named(tiny_loaded, tiny_model_dir, tmp_path):
    model_id = tiny_loaded.model_id
    store = marked_store(tmp_path / "round.db", model_id, 60, learnable=False)
    code, summary = run_round(runner(tmp_path, tiny_model_dir, "ppo"))
    assert code == 0 and summary["status"] == "skipped", summary
    assert "does not clear chance" in summary["reason"] and summary["reward_model"] == "r1"
    assert store.reward_model(model_id, "r1")["usable"] == 0  # recorded as such
    assert store.latest_reward_model(model_id, usable_only=True) is None
    assert not (tmp_path / "adapters").exists() or not list((tmp_path / "adapters").glob("v*"))
    # The admin's explicit choice: used anyway. The round answers for every pair waiting when it started,
    # so the schedule waits for new votes rather than starting round after round against r1.
    assert store.count_new_pairs(model_id) > 0
    code, summary = run_round(runner(tmp_path, tiny_model_dir, "ppo", "--reward-model", "r1"))
    assert summary["status"] == "succeeded" and summary["version"] == "v1", summary
    assert store.count_new_pairs(model_id) == 0
    # A reward model that does not exist: a clear failure, nothing published.
    code, summary = run_round(runner(tmp_path, tiny_model_dir, "ppo", "--reward-model", "r9"))
    assert code == 1 and "no reward model r9" in summary["reason"]


def test_too_few_pairs_for_a_reward_model_skip_with_the_reason(tiny_loaded, tiny_model_dir, tmp_path):
    marked_store(tmp_path / "round.db", tiny_loaded.model_id, 5)
    for algo in ("reward", "ppo"):
        code, summary = run_round(runner(tmp_path, tiny_model_dir, algo))
        assert code == 0 and summary["status"] == "skipped", summary
        assert "a reward model needs at least 8" in summary["reason"]


def test_bad_settings_are_refused_before_anything_runs(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown PPOConfig settings"):
        run_round(runner(tmp_path, tiny_model_dir, "ppo", config={"beta": 0.1}))
    with pytest.raises(SystemExit, match="unknown RewardConfig settings"):
        run_round(runner(tmp_path, tiny_model_dir, "reward", config={"kl_coef": 0.1}))


def test_a_scheduled_ppo_round_goes_live_through_the_app(tiny_loaded, tiny_model_dir, tmp_path):
    # A usable reward model from earlier votes, then the app's schedule on PPO against it.
    model_id = tiny_loaded.model_id
    marked_store(tmp_path / "loop.db", model_id, 120).close()
    code, summary = run_round(parse_args([
        "--algo", "reward", "--db", str(tmp_path / "loop.db"), "--reward-models-dir", str(tmp_path / "reward_models"),
        "--model", str(tiny_model_dir), "--config", json.dumps(REWARD), "--no-progress"]))
    assert summary["status"] == "succeeded", summary
    # The store already holds 108 new pairs: with the test's 1.2 s schedule a check could start a round
    # before the test names r1, so the schedule's interval is long here and the round starts as a vote
    # after /resume nudges the same scheduled check.
    settings = loop_settings(tmp_path, algo="ppo", reward_models_dir=str(tmp_path / "reward_models"),
                             train_every_min=60)
    with running_app(tiny_loaded, tmp_path / "loop.db", loop_settings=settings) as (url, service, loop):
        client = Client(url, verbose=False)
        client.predict(api_name="/pause")
        loop.set_algo("ppo", "r1")  # the admin's choice of reward model
        loop.set_next_config(PPO)
        vote_in_new_conversations(client, 6)
        client.predict(api_name="/resume")
        vote_in_new_conversations(client, 1)  # nudges the scheduled check to now
        status = wait_for(lambda: (s := client.predict(api_name="/training_status"))["live"] == "v1" and s,
                          what="the PPO version to go live")
        assert status["algo"] == "ppo"
        run = [r for r in service.store.runs() if r["status"] == "succeeded"][0]
        assert run["algo"] == "ppo" and run["reward_model"] == "r1" and run["version"] == "v1"
        assert service.store.version(model_id, "v1")["algo"] == "ppo"
        reply = client.predict("after the ppo round", api_name="/send", **FAST_SAMPLING)
        assert {r["policy_version"] for r in reply["replies"].values()} == {"v1"}


def test_the_next_rounds_settings_are_applied_all_or_nothing(tiny_loaded, tmp_path):
    from playground.loop import LoopSettings, TrainingLoop
    from playground.serving.policy import PolicyHolder

    store = Store(tmp_path / "settings.db")
    loop = TrainingLoop(LoopSettings(db=str(tmp_path / "settings.db"), adapters_dir=str(tmp_path / "a"),
                                     model=tiny_loaded.model_id, model_cache=str(tmp_path / "c"), enabled=False),
                        store, PolicyHolder(tiny_loaded))
    loop.set_next_config({"beta": 0.3})
    for bad in [("ppo", {"iterations": 0}, None), ("ppo", {"beta": 0.1}, None), ("ppo", {}, "r5"),
                ("sft", {}, None)]:
        with pytest.raises(ValueError):
            loop.set_round(*bad)
        assert loop.settings.algo == "dpo" and loop.next_config() == {"beta": 0.3}  # nothing changed
    assert loop.set_round("ppo", {"kl_coef": 0.1}) == {"kl_coef": 0.1}
    assert loop.settings.algo == "ppo" and loop.status()["algo"] == "ppo"
    store.close()
