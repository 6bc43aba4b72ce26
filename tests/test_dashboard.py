"""The dashboard's data, computed from a real SQLite store built by hand: every section has the numbers the
hand-built rows imply (or a sentence saying why it is empty), and the dict survives JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from playground.dashboard import Dashboard, compare, dashboard_data
from store import Store

MODEL = "tiny-model"


def reply(slot, text, version, n_tokens=None, model=MODEL):
    return {"slot": slot, "text": text, "policy_version": version, "model_id": model, "seed": 1,
            "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "finish_reason": "stop",
            "n_tokens": n_tokens if n_tokens is not None else len(text.split()), "logprob_sum": -3.0}


def turn(store, conversation, idx, a, b, choice, user="ann", model=MODEL):
    turn_id, _ = store.record_turn(conversation, idx, [{"role": "user", "content": f"q{idx}"}], f"q{idx}",
                                   [reply("a", *a, model=model), reply("b", *b, model=model)], prompt_tokens=4)
    if choice:
        store.record_choice(turn_id, 0, choice, user, "s")
    return turn_id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "dash.db")
    s.ensure_base_version(MODEL)
    yield s
    s.close()


def with_versions(store, *names, model=MODEL):
    for i, name in enumerate(names):
        store.record_version(name, model, "v0" if i == 0 else names[i - 1], f"/nowhere/{name}", {})
    store.record_live(model, names[-1], "promote")


def test_a_fresh_store_says_in_words_why_each_plot_is_empty(store):
    data = json.loads(json.dumps(dashboard_data(store, MODEL)))  # JSON all the way through
    assert data["live"] == "v0" and [v["name"] for v in data["versions"]] == ["v0"]
    assert data["evaluations"] == [{"version": "v0", "status": "missing", "error": None, "attempt": None}]
    for key in ("versions", "kl", "arena", "staleness", "curves", "annotators", "frontier", "prompt_drift", "map"):
        assert data["notes"].get(key), f"no sentence for the empty {key} plot"
    assert data["arena"] == {"win_vs_v0": [], "leaderboard": [], "n_battles": 0}
    assert data["identical_pairs"] == {"share": None, "n": 0, "n_identical": 0}


def test_arena_votes_length_bias_identical_pairs_and_annotators(store):
    with_versions(store, "v1")
    c = store.start_conversation("s", "ann", MODEL, "")
    # Arena: v1 on the left twice (wins both), on the right twice (one win, one tie); one both-bad.
    turn(store, c, 0, ("short", "v1"), ("a much longer reply", "v0"), "a")
    turn(store, c, 1, ("tiny", "v1"), ("longer reply here", "v0"), "a")
    turn(store, c, 2, ("reply one two three", "v0"), ("v1 says", "v1"), "b")
    turn(store, c, 3, ("same length x", "v0"), ("same length y", "v1"), "tie")
    turn(store, c, 4, ("bad one", "v0"), ("bad two", "v1"), "both_bad", user="bob")
    # Ordinary v1 pairs: the longer won once, the shorter once, and one pair of identical replies.
    turn(store, c, 5, ("one two three four", "v1"), ("one", "v1"), "a")
    turn(store, c, 6, ("one two", "v1"), ("one two three", "v1"), "a")
    turn(store, c, 7, ("same", "v1"), ("same", "v1"), None)
    data = dashboard_data(store, MODEL)

    (row,) = data["arena"]["win_vs_v0"]
    assert (row["version"], row["wins"], row["losses"], row["ties"], row["n"]) == ("v1", 3, 0, 2, 5)
    assert row["rate"] == pytest.approx(4 / 5)
    assert row["lo"] < row["rate"] < row["hi"]
    board = {r["version"]: r for r in data["arena"]["leaderboard"]}
    assert board["v0"]["rating"] == pytest.approx(1000.0)
    assert board["v1"]["rating"] > 1000.0 and board["v1"]["n"] == 5
    assert data["arena"]["n_battles"] == 5

    # Length: of the a/b votes between replies of unequal length (turns 0, 1, 2, 5, 6), the longer won in 5.
    bias = data["length_bias"]
    assert bias["n"] == 5 and bias["longer_won"] == pytest.approx(1 / 5)
    assert "longer reply won 20% of 5" in data["notes"]["length_bias"]
    assert data["identical_pairs"] == {"share": pytest.approx(1 / 8), "n": 8, "n_identical": 1}

    users = {u["user"]: u for u in data["annotators"]}
    assert users["ann"]["votes"] == 6 and users["bob"]["votes"] == 1
    assert users["ann"]["left_share"] == pytest.approx(4 / 5)  # a, a, b, a, a among a/b choices
    assert users["ann"]["tie_share"] == pytest.approx(1 / 6) and users["bob"]["both_bad_share"] == 1.0
    json.dumps(data)


def add_evaluation(store, version, embeddings, kl, parent=None, texts=None, finish="stop", status="succeeded",
                   model=MODEL, n_tokens=None):
    eid = store.start_evaluation(model, version, parent, "probes-hash", len(embeddings), 2, {})
    samples = []
    for i, e in enumerate(embeddings):
        samples.append({"probe_idx": i // 2, "sample": i % 2, "text": (texts or [f"reply {i}"] * len(embeddings))[i],
                        "n_tokens": 10 + i if n_tokens is None else n_tokens[i], "finish_reason": finish,
                        "token_ids": [1, 2], "logprob_sum": -1.0,
                        "kl_v0": kl[i], "kl_prev": None if parent is None else kl[i] / 2,
                        "embedding": np.asarray(e, dtype=np.float32).tobytes()})
    store.add_eval_samples(eid, samples)
    if status == "succeeded":
        store.finish_evaluation(eid, {})
    else:
        store.fail_evaluation(eid, "boom: the adapter folder is gone")
    return eid


def test_evaluations_give_kl_length_diversity_drift_and_held_out_accuracy(store):
    with_versions(store, "v1", "v2")
    base = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]]
    add_evaluation(store, "v0", base, [0, 0, 0, 0], texts=["a b", "a b", "c d", "c d"])
    moved = [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    eid = add_evaluation(store, "v1", moved, [1.0, 2.0, 3.0, 6.0], parent="v0",
                         texts=["x y z", "x y z", "x y z", "x y z"], finish="length")
    store.add_eval_pairs(eid, [{"training_pair_id": 1, "source_version": "v0", "margin": 0.5},
                               {"training_pair_id": 2, "source_version": "v0", "margin": -0.1},
                               {"training_pair_id": 3, "source_version": "v1", "margin": 0.0}])
    add_evaluation(store, "v2", moved, [1, 1, 1, 1], parent="v1", status="failed")
    data = dashboard_data(store, MODEL)
    ev = {e["version"]: e for e in data["evaluations"]}

    assert ev["v0"]["kl_v0"]["mean"] == 0.0 and ev["v0"]["semantic_drift"] == pytest.approx(0.0, abs=1e-6)
    assert ev["v1"]["kl_v0"]["mean"] == pytest.approx(3.0) and ev["v1"]["kl_v0"]["n"] == 4
    assert ev["v1"]["kl_prev"]["mean"] == pytest.approx(1.5)
    assert ev["v1"]["sqrt_kl_v0"] == pytest.approx(math.sqrt(3.0))
    assert ev["v1"]["length"]["limit_share"] == 1.0 and ev["v1"]["length"]["mean"] == pytest.approx(11.5)
    # v1 repeats one sentence: distinct-1 is 3 unique of 12 words; its two samples per probe are identical.
    assert ev["v1"]["distinct_1"] == pytest.approx(3 / 12) and ev["v0"]["distinct_1"] == pytest.approx(4 / 8)
    assert ev["v1"]["self_similarity"]["mean"] == pytest.approx(1.0)
    # v1's mean embedding is orthogonal to v0's: drift 1.
    assert ev["v1"]["semantic_drift"] == pytest.approx(1.0)
    # Held out, by the version that sampled the pair: one right and one wrong of v0's; a zero margin is half.
    on_v0, on_v1 = ev["v1"]["held_out"]
    assert (on_v0["source_version"], on_v0["accuracy"], on_v0["n"]) == ("v0", 0.5, 2)
    assert (on_v0["lo"], on_v0["hi"]) == pytest.approx((0.0945, 0.9055), abs=1e-3)
    assert (on_v1["source_version"], on_v1["accuracy"], on_v1["n"]) == ("v1", 0.5, 1)
    assert ev["v2"]["status"] == "failed" and "adapter folder is gone" in ev["v2"]["error"]
    assert "v2 failed" in data["notes"]["evaluations"]
    # The map: one point per probe per evaluated version (the first sample), on one projection.
    assert sorted((p["version"], p["probe_idx"]) for p in data["map"]) == [("v0", 0), ("v0", 1), ("v1", 0), ("v1", 1)]
    assert compare(store, MODEL, "v0", "v1") == [{"prompt": "probe 1", "a": "a b", "b": "x y z"},
                                                {"prompt": "probe 2", "a": "c d", "b": "x y z"}]
    probes = [[{"role": "user", "content": "first?"}], [{"role": "user", "content": "second?"}]]
    assert Dashboard(store, MODEL, probes=probes).compare("v0", "v1")[1]["prompt"] == "second?"
    assert compare(store, MODEL, "v0", "v2") == []  # v2 never finished an evaluation


def test_prompt_drift_embeds_each_prompt_once_and_staleness_reads_the_rounds(store):
    c = store.start_conversation("s", "ann", MODEL, "")
    for i in range(20):
        turn(store, c, i, ("x", "v0"), ("y", "v0"), None)
    calls = []

    def embed(texts):
        calls.append(len(texts))
        # The first half of the prompts point one way, the second half another.
        return np.array([[1.0, 0.0] if int(t[1:]) < 10 else [0.0, 1.0] for t in texts])

    cache: dict = {}
    data = dashboard_data(store, MODEL, embed, cache)
    drift = data["prompt_drift"]
    assert len(drift) == 4 and drift[0]["drift"] == pytest.approx(0.0) and drift[-1]["drift"] == pytest.approx(1.0)
    assert all(row["start"] <= row["end"] for row in drift)
    dashboard_data(store, MODEL, embed, cache)
    assert calls == [20], "prompts already embedded were embedded again"
    assert "not loaded" in dashboard_data(store, MODEL)["notes"]["prompt_drift"]

    run = store.create_run("dpo", {}, MODEL, "v0", "manual")
    store.finish_run(run, "succeeded", version="v1", metrics={"staleness": {
        "n": 10, "share_older": 0.3, "mean_lag": 0.4, "off_policy_gap": 1.5, "n_gap": 12, "by_version": {"v0": 10}}})
    (row,) = dashboard_data(store, MODEL)["staleness"]
    assert row == {"run_id": run, "version": "v1", "parent": "v0", "n": 10, "share_older": 0.3, "mean_lag": 0.4,
                   "off_policy_gap": 1.5, "n_gap": 12}


def test_the_service_recomputes_only_when_the_store_changed(store):
    dashboard = Dashboard(store, MODEL)
    first = dashboard.data()
    assert dashboard.data() is first
    c = store.start_conversation("s", "ann", MODEL, "")
    turn(store, c, 0, ("x y", "v0"), ("y", "v0"), "a")
    second = dashboard.data()
    assert second is not first and second["length_bias"]["n"] == 1


PLOT_SECTIONS = ("versions", "evaluations", "map", "prompt_drift", "length_bias", "identical_pairs", "staleness",
                 "arena", "frontier", "curves", "annotators", "notes")


def test_a_round_that_moves_the_policy_shows_on_the_dashboard(tiny_loaded, tmp_path):
    """Through the real app: votes, a round, v1 live; the background evaluation measures v0 and v1 on a
    small probe file; /dashboard then has v1's KL to v0 above zero and every section's series."""
    from gradio_client import Client

    from tests.servers import running_app
    from tests.test_loop import loop_settings, vote_in_new_conversations, wait_for

    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(f"Probe question number {i}?" for i in range(8)) + "\n")
    settings = loop_settings(tmp_path, min_new_pairs=6, enabled=False)
    with running_app(tiny_loaded, tmp_path / "e2e.db", loop_settings=settings,
                     extra_args=("--probes", str(probes), "--eval-samples", "2")) as (url, service, loop):
        client = Client(url, verbose=False)
        loop.set_next_config({"epochs": 20, "learning_rate": 5e-3})
        vote_in_new_conversations(client, 8)
        client.predict(api_name="/train_now")
        wait_for(lambda: client.predict(api_name="/training_status")["live"] == "v1", what="v1 to go live")
        model_id = service.policy.model_id

        def evaluated():
            rows = {e["version"]: e["status"] for e in service.store.evaluations(model_id)}
            return rows.get("v0") == rows.get("v1") == "succeeded"

        wait_for(evaluated, what="v0's and v1's evaluations")
        data = client.predict(api_name="/dashboard")
        assert set(PLOT_SECTIONS) <= set(data)
        ev = {e["version"]: e for e in data["evaluations"]}
        assert ev["v0"]["kl_v0"]["mean"] == 0.0
        assert ev["v1"]["kl_v0"]["mean"] > 0 and ev["v1"]["kl_v0"]["n"] == 8 * 2
        assert ev["v1"]["kl_v0"]["lo"] <= ev["v1"]["kl_v0"]["mean"] <= ev["v1"]["kl_v0"]["hi"]
        assert ev["v1"]["length"]["n"] == 16 and ev["v1"]["distinct_1"] > 0
        assert ev["v1"]["semantic_drift"] is not None
        assert {p["version"] for p in data["map"]} == {"v0", "v1"}
        assert data["curves"]["run_id"] is not None and data["curves"]["series"]
        (stale,) = data["staleness"]
        assert stale["version"] == "v1" and stale["n"] >= 6 and stale["share_older"] == 0.0
        assert [v["name"] for v in data["versions"]] == ["v0", "v1"] and data["live"] == "v1"
        compared = client.predict("v0", "v1", api_name="/compare")
        assert len(compared) == 8 and compared[0]["prompt"] == "Probe question number 0?"



def test_overopt_runs_and_the_algorithm_of_each_version_reach_the_dashboard(store):
    with_versions(store, "v1")
    store.record_version("v2", MODEL, "v1", "adapters/v2", {"algo": "ppo", "reward_model": "r1"})
    point = {"bench_id": "run-a", "model_id": MODEL, "gold": "concise", "reward_model": "r1", "method": "best_of_n",
             "x": 4.0, "kl": 0.636, "kl_low": None, "kl_high": None, "proxy": 1.0, "proxy_low": 0.8, "proxy_high": 1.2,
             "gold_score": 0.3, "gold_low": 0.2, "gold_high": 0.4, "n_prompts": 24}
    marker = store.change_marker()
    store.add_overopt_points([point, dict(point, x=1.0, kl=0.0), dict(point, bench_id="run-b", gold="keyword"),
                              dict(point, model_id="another/model")])
    assert store.change_marker() != marker  # the dashboard recomputes
    data = dashboard_data(store, MODEL)
    assert [(r["bench_id"], r["gold"], len(r["points"])) for r in data["overopt"]] == [("run-a", "concise", 2),
                                                                                    ("run-b", "keyword", 1)]
    assert {v["name"]: v["algo"] for v in data["versions"]} == {"v0": "base", "v1": "dpo", "v2": "ppo"}
    json.dumps(data)  # still plain JSON
