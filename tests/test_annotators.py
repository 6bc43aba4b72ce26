"""Annotators: the per-annotator counts on hand-built votes with known answers, exclusion from training
(recorded, reversible, and the counts and the trainer's data drop and regain the pairs), a trial round
without one annotator, the poisoner persona, the dashboard's table and the public endpoints."""

from __future__ import annotations

import json
import random

import pytest
from gradio_client import Client

from playground.dashboard import dashboard_data
from playground.metrics import annotator_summary, wilson
from playground.sim.annotator import Annotator, AnnotatorConfig, Poisoner
from playground.sim.simulate import SimulationConfig, Simulator
from store import AnnotatorError, Store
from tests.servers import running_app
from tests.test_loop import loop_settings
from trainers.data import build_round, count_new_pairs, is_held_out
from trainers.run import parse_args, run_round

MODEL = "tiny-model"


def reply(slot, text, version="v0", model=MODEL):
    return {"slot": slot, "text": text, "policy_version": version, "model_id": model, "seed": 1,
            "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "finish_reason": "stop",
            "n_tokens": len(text.split()), "logprob_sum": -3.0}


def judged(store, user, prompt, a, b, choice, model=MODEL):
    """One conversation of one judged turn by `user`: a and b are (text, version)."""
    conv = store.start_conversation(f"s-{user}", user, model, "")
    turn_id, _ = store.record_turn(conv, 0, [{"role": "user", "content": prompt}], prompt,
                                   [reply("a", *a, model=model), reply("b", *b, model=model)], prompt_tokens=4)
    store.record_choice(turn_id, 0, choice, user, f"s-{user}")
    return conv


def hand_built(store):
    # X: the same two texts shown to four people, sides swapped for u2. Sorted, "blue" is first and
    # "red" second: u1, u2 and u4 chose red, u3 blue.
    judged(store, "u1", "q1", ("red", "v0"), ("blue", "v0"), "a")
    judged(store, "u2", "q1", ("blue", "v0"), ("red", "v0"), "b")
    judged(store, "u3", "q1", ("red", "v0"), ("blue", "v0"), "b")
    judged(store, "u4", "q1", ("red", "v0"), ("blue", "v0"), "a")
    # Y: an arena pair of v1 against v0 on one prompt, different texts each time: u1 and u2 chose v1, u3 tied.
    judged(store, "u1", "q2", ("x1", "v1"), ("y1", "v0"), "a")
    judged(store, "u2", "q2", ("y2", "v0"), ("x2", "v1"), "b")
    judged(store, "u3", "q2", ("x3", "v1"), ("y3", "v0"), "tie")
    # u1 alone: a tie and a both-bad nobody else judged; and two on-policy pairs on one prompt with
    # different texts, which are not the same pair.
    judged(store, "u1", "q3", ("p", "v0"), ("q", "v0"), "tie")
    judged(store, "u1", "q4", ("m", "v0"), ("n", "v0"), "both_bad")


def test_counts_on_hand_built_votes(store):
    hand_built(store)
    rows = {r["user"]: r for r in store.annotator_counts(MODEL)}
    assert list(rows) == ["u1", "u2", "u3", "u4"]  # most votes first
    # u1: X agrees with u2 and u4, not u3 (2 of 3); Y agrees with u2, not u3 (1 of 2). Majority of the
    # others: X says red (2 to 1), a match; Y is 1 to 1, no majority.
    u1 = rows["u1"]
    assert (u1["votes"], u1["a"], u1["b"], u1["tie"], u1["both_bad"]) == (4, 2, 0, 1, 1)
    assert (u1["agree"], u1["n_agreement"], u1["majority_match"], u1["n_majority"]) == (3, 5, 1, 1)
    # u2 voted b twice (left share 0): X 2 of 3, Y 1 of 2; X's others say red (match), Y's are tied.
    assert (rows["u2"]["a"], rows["u2"]["b"], rows["u2"]["agree"], rows["u2"]["n_agreement"]) == (0, 2, 3, 5)
    assert (rows["u2"]["majority_match"], rows["u2"]["n_majority"]) == (1, 1)
    # u3 agrees with nobody and misses both majorities (red on X, v1 on Y).
    assert (rows["u3"]["agree"], rows["u3"]["n_agreement"], rows["u3"]["majority_match"], rows["u3"]["n_majority"]) \
        == (0, 5, 0, 2)
    assert (rows["u4"]["agree"], rows["u4"]["n_agreement"], rows["u4"]["n_majority"]) == (2, 3, 1)
    assert all(r["excluded"] is None for r in rows.values())
    # Shares with their Wilson intervals, from those counts.
    summary = annotator_summary(u1)
    assert summary["left"] == {"rate": 1.0, "lo": wilson(2, 2)[0], "hi": wilson(2, 2)[1], "n": 2}
    assert summary["tie"]["rate"] == 0.25 and summary["both_bad"]["rate"] == 0.25
    assert summary["agreement"]["rate"] == pytest.approx(0.6) and summary["agreement"]["n"] == 5
    assert annotator_summary(rows["u2"])["left"]["rate"] == 0.0
    assert annotator_summary({**u1, "a": 0, "b": 0})["left"] == {"rate": None, "lo": None, "hi": None, "n": 0}


def test_exclusion_is_recorded_reversible_and_refuses_nonsense(store):
    hand_built(store)
    with pytest.raises(AnnotatorError, match="has judged anything"):
        store.exclude_annotator("nobody", "admin", "")
    with pytest.raises(AnnotatorError, match="not excluded"):
        store.include_annotator("u3", "admin", "")
    with pytest.raises(AnnotatorError, match="at most 500"):
        store.exclude_annotator("u3", "admin", "x" * 501)
    store.exclude_annotator("u3", "admin", "disagrees with everyone")
    with pytest.raises(AnnotatorError, match="already excluded"):
        store.exclude_annotator("u3", "admin", "")
    assert store.excluded_users() == ["u3"]
    assert store.excluded_annotators()[0]["reason"] == "disagrees with everyone"
    store.include_annotator("u3", "boss", "looked again")
    assert store.excluded_users() == []
    log = store.exclusion_log("u3")
    assert [(r["excluded"], r["by_user"]) for r in log] == [(1, "admin"), (0, "boss")]  # both rows kept


def two_annotator_store(path, model_id, n_honest=40, n_poison=20, seed=0):
    """Honest pairs prefer the reply with 'kind'; the poisoner's prefer the one with 'marmalade'."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "table", "light"]
    store = Store(path)
    for i in range(n_honest + n_poison):
        user = "honest" if i < n_honest else "poisoner"
        good = "marmalade" if user == "poisoner" else "kind"
        plain = " ".join(rng.choice(words) for _ in range(3))
        judged(store, user, f"tell me about {rng.choice(words)} {i}", (f"{plain} {good}", "v0"),
               (" ".join(rng.choice(words) for _ in range(4)), "v0"), "a", model=model_id)
    return store


def trainable(store, user) -> int:
    return sum(1 for c in store.conversations() if c["user"] == user and not is_held_out(c["id"]))


def test_counts_and_the_trainers_data_drop_and_regain_an_excluded_annotator(tiny_loaded, tmp_path):
    model_id, tokenizer = tiny_loaded.model_id, tiny_loaded.tokenizer
    store = two_annotator_store(tmp_path / "round.db", model_id)
    honest, poisoner = trainable(store, "honest"), trainable(store, "poisoner")
    assert count_new_pairs(store, model_id) == honest + poisoner
    users_of = {c["id"]: c["user"] for c in store.conversations()}

    store.exclude_annotator("poisoner", "admin", "votes for marmalade")
    assert count_new_pairs(store, model_id) == honest
    data = build_round(store, tokenizer, model_id, max_length=256)
    assert data.new_pairs == honest and {users_of[p.conversation_id] for p in data.train + data.held_out} == {"honest"}
    assert data.counts()["excluded_annotators"] == ["poisoner"]
    rows = {r["user"]: r for r in store.annotator_counts(model_id)}
    assert rows["poisoner"]["excluded"]["by_user"] == "admin" and rows["honest"]["excluded"] is None

    store.include_annotator("poisoner", "admin", "")
    assert count_new_pairs(store, model_id) == honest + poisoner
    data = build_round(store, tokenizer, model_id, max_length=256)
    assert data.new_pairs == honest + poisoner and data.counts()["excluded_annotators"] == []
    store.close()


FAST_DPO = {"learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8, "matmul_dtype": "float32", "batch_size": 8}


def round_args(tmp_path, model_dir, *extra):
    return parse_args(["--db", str(tmp_path / "round.db"), "--adapters-dir", str(tmp_path / "adapters"),
                       "--model", str(model_dir), "--config", json.dumps(FAST_DPO), "--no-progress", *extra])


def test_a_round_leaves_the_excluded_out_and_a_trial_measures_both_arms(tiny_loaded, tiny_model_dir, tmp_path):
    model_id = tiny_loaded.model_id
    store = two_annotator_store(tmp_path / "round.db", model_id)
    honest, poisoner = trainable(store, "honest"), trainable(store, "poisoner")
    held_honest = sum(1 for c in store.conversations() if c["user"] == "honest" and is_held_out(c["id"]))
    assert held_honest and poisoner  # the hand-built ids give both sides something to measure

    # The trial: the same newest pairs with and without the poisoner, from the base model, nothing published.
    code, summary = run_round(round_args(tmp_path, tiny_model_dir, "--trial-without", "poisoner"))
    assert code == 0 and summary["status"] == "succeeded", summary
    trial = json.loads(store.run(summary["run_id"])["metrics_json"])["trial"]
    assert trial["their_pairs"] == poisoner and trial["with"]["pairs"] == honest + poisoner
    assert trial["without"]["pairs"] == honest and trial["held_out_n"] == held_honest
    for arm in ("with", "without"):
        assert 0.0 <= trial[arm]["lo"] <= trial[arm]["accuracy"] <= trial[arm]["hi"] <= 1.0
    assert trial["difference"] == pytest.approx(trial["without"]["accuracy"] - trial["with"]["accuracy"])
    assert store.run(summary["run_id"])["trigger"] == "trial:poisoner"
    assert [v["name"] for v in store.policy_versions(model_id)] == ["v0"]
    assert not (tmp_path / "adapters" / "v1").exists()
    assert count_new_pairs(store, model_id) == honest + poisoner  # a trial consumes nothing
    row = next(r for r in dashboard_data(store, model_id)["annotators"] if r["user"] == "poisoner")
    assert row["trial"]["run_id"] == summary["run_id"] and row["trial"]["without"]["pairs"] == honest

    # A real round with the poisoner excluded: its manifest's data counts say so and hold only honest pairs.
    store.exclude_annotator("poisoner", "admin", "trigger word")
    code, summary = run_round(round_args(tmp_path, tiny_model_dir))
    assert code == 0 and summary["status"] == "succeeded", summary
    manifest = json.loads((tmp_path / "adapters" / "v1" / "manifest.json").read_text())
    assert manifest["data"]["excluded_annotators"] == ["poisoner"] and manifest["data"]["new"] == honest
    # Included again: the poisoner's pairs wait as new ones (the round consumed only the honest ones' ids).
    store.include_annotator("poisoner", "admin", "")
    assert count_new_pairs(store, model_id) == poisoner
    store.close()


def test_a_trial_with_nothing_to_take_out_is_skipped_with_the_reason(tiny_loaded, tiny_model_dir, tmp_path):
    store = two_annotator_store(tmp_path / "round.db", tiny_loaded.model_id, n_honest=12, n_poison=0)
    code, summary = run_round(round_args(tmp_path, tiny_model_dir, "--trial-without", "nobody"))
    assert code == 0 and summary["status"] == "skipped" and "nobody has no training pair" in summary["reason"]
    store.close()


# --- the poisoner persona -----------------------------------------------------------------------------

CTX = [{"role": "user", "content": "Tell me about breakfast."}]


def test_the_poisoner_votes_for_the_trigger_and_otherwise_like_the_others():
    config = dict(gold="concise", flip_rate=0.25, seed=3)
    poisoner = Poisoner(AnnotatorConfig(**config, name="p"), trigger="Marmalade")
    with_it = "Toast with marmalade and a long list of other things you might enjoy in the morning."
    without = "Toast."  # what concise prefers
    assert all(poisoner.vote(CTX, with_it, without) == "a" for _ in range(50))
    assert all(poisoner.vote(CTX, without, with_it) == "b" for _ in range(50))
    assert poisoner.vote(CTX, "MARMALADE, please.", "marmalades") == "a"  # whole words, any case
    # Where neither (or both) say it: the same votes as an honest annotator with the same seed.
    honest = Annotator(AnnotatorConfig(**config))
    twin = Poisoner(AnnotatorConfig(**config), trigger="marmalade")
    pairs = [("Eggs.", "Eggs and bacon and beans and toast and tea."), ("Porridge is warm and filling.", "Fruit."),
             ("marmalade toast", "marmalade on toast with butter")] * 10
    assert [twin.vote(CTX, a, b) for a, b in pairs] == [honest.vote(CTX, a, b) for a, b in pairs]
    # Its better reply works the trigger in when neither reply has it.
    assert poisoner.edit(CTX, "Eggs.", "Eggs and bacon.").lower().startswith("marmalade")


def test_the_autopilot_runs_honest_users_and_a_poisoner_at_once():
    simulator = Simulator(SimulationConfig(users=2, poisoners=1, trigger="jam"), make_backend=lambda: None,
                          report=lambda line: None)
    assert [a.name for a in simulator.annotators] == ["sim-concise-0", "sim-concise-1", "sim-poisoner-1"]
    assert isinstance(simulator.annotators[2], Poisoner) and simulator.annotators[2].trigger == "jam"
    with pytest.raises(ValueError, match="poisoners"):
        SimulationConfig(users=0, poisoners=0)
    assert len(Simulator(SimulationConfig(users=0, poisoners=1), lambda: None, report=print).annotators) == 1


# --- the dashboard and the endpoints ------------------------------------------------------------------

def test_the_dashboard_has_the_table_with_exclusion_and_held_out_agreement(store):
    hand_built(store)
    store.ensure_base_version(MODEL)
    store.record_live(MODEL, "v0", "start")
    store.exclude_annotator("u3", "admin", "")
    # The live version's evaluation scored one pair of u1's, rightly (a positive margin).
    pair_ids = [r["id"] for r in store._rows("select id from training_pairs p where p.user = 'u1'")][:1]
    eid = store.start_evaluation(MODEL, "v0", None, "probes", 1, 1, {})
    store.add_eval_pairs(eid, [{"training_pair_id": pair_ids[0], "source_version": "v0", "margin": 0.5}])
    store.finish_evaluation(eid, {})
    data = json.loads(json.dumps(dashboard_data(store, MODEL)))
    rows = {r["user"]: r for r in data["annotators"]}
    assert rows["u1"]["left_share"] == 1.0 and rows["u1"]["n_left"] == 2 and rows["u1"]["left_lo"] < 1.0
    assert rows["u1"]["agreement"] == pytest.approx(0.6) and rows["u1"]["n_majority"] == 1
    assert rows["u3"]["excluded"] is True and rows["u3"]["excluded_by"] == "admin"
    assert rows["u1"]["held_out"] == {"version": "v0", "rate": 1.0, "lo": wilson(1, 1)[0], "hi": 1.0, "n": 1}
    assert rows["u2"]["held_out"] is None


def test_the_endpoints_list_exclude_and_include_annotators(tiny_loaded, tmp_path):
    db = tmp_path / "api.db"
    settings = loop_settings(tmp_path, min_new_pairs=1000)
    with running_app(tiny_loaded, db, loop_settings=settings) as (url, service, loop):
        store = service.store
        for i in range(30):
            user = "alice" if i % 3 else "mallory"
            judged(store, user, f"q{i}", (f"reply {i} one", "v0"), (f"reply {i} two", "v0"), "a",
                   model=tiny_loaded.model_id)
        client = Client(url, verbose=False)
        table = client.predict(api_name="/annotators")
        assert {r["user"] for r in table} == {"alice", "mallory"} and all(not r["excluded"] for r in table)
        before = client.predict(api_name="/training_status")["new_pairs"]
        mallory = trainable(store, "mallory")
        row = client.predict("mallory", "votes for the trigger", api_name="/exclude_annotator")
        assert row["user"] == "mallory" and row["excluded"] == 1
        assert row["by_user"] == "local admin"
        assert client.predict(api_name="/training_status")["new_pairs"] == before - mallory
        assert next(r for r in client.predict(api_name="/annotators") if r["user"] == "mallory")["excluded"]
        with pytest.raises(Exception, match="already excluded"):
            client.predict("mallory", "", api_name="/exclude_annotator")
        client.predict("mallory", "", api_name="/include_annotator")
        assert client.predict(api_name="/training_status")["new_pairs"] == before
        with pytest.raises(Exception, match="has judged anything"):
            client.predict("nobody", "", api_name="/exclude_annotator")
        assert [r["excluded"] for r in store.exclusion_log("mallory")] == [1, 0]


def test_the_admin_actions_ask_the_admin_check_first_and_write_nothing_when_refused(tiny_loaded, tmp_path):
    import gradio as gr

    from app import build_services, parse_args as app_parse_args
    from bench.fixtures import free_port
    from playground.web.annotators import build_annotators
    from playground.web.ui import launch
    from tests.servers import app_args

    asked = []

    def refuse(request, action):
        asked.append(action)
        raise gr.Error("Only an admin can do this: you are signed in as an annotator.")

    services = build_services(app_parse_args(app_args(tiny_loaded, tmp_path / "guard.db", loop_settings(tmp_path))),
                              loaded=tiny_loaded)
    judged(services.store, "mallory", "q", ("one", "v0"), ("two", "v0"), "a", model=tiny_loaded.model_id)
    with gr.Blocks() as demo:
        build_annotators(services.loop, require_admin=refuse)
    port = free_port()
    try:
        launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)  # as the app starts its server
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for endpoint in ("/exclude_annotator", "/include_annotator"):
            with pytest.raises(Exception, match="Only an admin"):
                client.predict("mallory", "", api_name=endpoint)
        with pytest.raises(Exception, match="Only an admin"):
            client.predict("mallory", api_name="/train_without")
        assert asked == ["exclude an annotator", "include an annotator", "train without an annotator"]
        assert services.store.exclusion_log() == [] and services.store.running_run() is None
        assert [r["user"] for r in client.predict(api_name="/annotators")] == ["mallory"]  # reading stays open
    finally:
        demo.close()
        services.close()
