"""Versions of a model the decode engine does not support: every version's LoRA on one PEFT model over one
shared copy of the base weights, rows naming their version (playground/serving/peft_host.py)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from playground.serving import engine as engine_mod
from playground.serving.adapters import AdapterError, publish, version_snapshot
from playground.serving.generation import SamplingSettings, sample_pair
from playground.serving.peft_host import BASE_ROW, HostedVersion, PeftHost
from playground.serving.policy import PolicyHolder
from tests.test_adapters import lora_writer, manifest

FAST = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}
PROMPT = [5, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def gelu_loaded(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a GELU MLP: a real model the engine refuses (it implements SiLU only)."""
    from playground.serving.models import load_model

    folder = tmp_path_factory.mktemp("tiny-gelu")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(folder), "cpu")
    assert not engine_mod.supports(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def versions(gelu_loaded, tmp_path_factory):
    """Two published versions of the GELU model (random LoRA B, so each changes the logits)."""
    adapters = tmp_path_factory.mktemp("gelu-adapters")
    return {name: publish(adapters, name, lora_writer(gelu_loaded.model, seed=seed, scale=0.3),
                          manifest(gelu_loaded.model_id))
            for name, seed in (("v1", 1), ("v2", 2))}


def peft_alone(base, folder):
    """The version as PEFT serves it on its own: a PeftModel on a private copy of the weights."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


@torch.inference_mode()
def test_a_batch_mixing_v0_v1_and_v2_rows_matches_each_version_alone(gelu_loaded, versions):
    base = gelu_loaded.model
    host = PeftHost(base)
    host.add("v1", versions["v1"])
    host.add("v2", versions["v2"])
    ids = torch.tensor([PROMPT] * 3)
    mixed = host.forward([BASE_ROW, "v1", "v2"], input_ids=ids).logits
    alone = [base(input_ids=ids[:1]).logits[0]] + [peft_alone(base, versions[v])(input_ids=ids[:1]).logits[0]
                                                   for v in ("v1", "v2")]
    for row, expected in zip(mixed, alone):
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)
    # The adapters do change the logits, so the match above is not the base model three times.
    assert (alone[1] - alone[0]).abs().max() > 1e-2 and (alone[2] - alone[1]).abs().max() > 1e-2


@torch.inference_mode()
def test_calls_on_one_version_each_switch_to_that_version(gelu_loaded, versions):
    """A call whose rows are all one version takes PEFT's plain forward on that adapter: in any order of
    calls, each gives its version's logits (and v0's are the served model's)."""
    base = gelu_loaded.model
    host = PeftHost(base)
    host.add("v1", versions["v1"])
    host.add("v2", versions["v2"])
    ids = torch.tensor([PROMPT] * 2)
    expected = {BASE_ROW: base(input_ids=ids).logits,
                **{v: peft_alone(base, versions[v])(input_ids=ids).logits for v in ("v1", "v2")}}
    for name in ("v2", "v1", "v1", BASE_ROW, "v2", "v1"):
        torch.testing.assert_close(host.forward([name, name], input_ids=ids).logits, expected[name],
                                   rtol=1e-5, atol=1e-5)
    host.remove("v1")  # the active adapter goes: the next call on v2 must still be v2
    torch.testing.assert_close(host.forward(["v2", "v2"], input_ids=ids).logits, expected["v2"], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="v1"):
        host.forward(["v1", "v1"], input_ids=ids)


@torch.inference_mode()
def test_the_host_copies_no_weight_and_leaves_the_base_model_as_it_was(gelu_loaded, versions):
    base = gelu_loaded.model
    ids = torch.tensor([PROMPT])
    before = base(input_ids=ids).logits.clone()
    host = PeftHost(base)
    host.add("v1", versions["v1"])
    host.add("v2", versions["v2"])
    base_tensors = {p.data_ptr() for p in base.parameters()}
    hosted = {n: p for n, p in host._peft.named_parameters()}
    # Every parameter of the host but the LoRA matrices is one of the base model's own tensors.
    assert {p.data_ptr() for n, p in hosted.items() if "lora_" not in n} == base_tensors
    lora = sum(p.numel() for n, p in hosted.items() if "lora_" in n)
    assert 0 < lora < 0.2 * sum(p.numel() for p in base.parameters())
    # The served base model has no LoRA layer in it and gives v0's logits still.
    assert not any("lora" in n for n, _ in base.named_modules())
    torch.testing.assert_close(base(input_ids=ids).logits, before, rtol=0, atol=0)
    # Switching the active adapter (one version per call) leaves nothing trainable: no graph is built.
    for name in ("v1", "v2", BASE_ROW, "v1"):
        host.forward([name], input_ids=ids)
    assert not any(p.requires_grad for p in host._peft.parameters())


def test_a_hosted_version_samples_what_its_merged_copy_samples(gelu_loaded, versions):
    """Through the KV cache, step by step, with the seeds' own generators: the same reply as the merged copy
    the app served before (float rounding of merged against unmerged aside: the log-probs to 1e-4)."""
    from playground.serving.adapters import merged_model

    host = PeftHost(gelu_loaded.model)
    host.add("v1", versions["v1"])
    settings = SamplingSettings(**FAST)
    *_, hosted = sample_pair(host.version("v1"), gelu_loaded.tokenizer, PROMPT, settings, (11, 12))
    *_, merged = sample_pair(merged_model(gelu_loaded.model, versions["v1"]), gelu_loaded.tokenizer, PROMPT,
                             settings, (11, 12))
    for h, m in zip(hosted, merged):
        assert h.token_ids == m.token_ids
        assert h.logprob_sum == pytest.approx(m.logprob_sum, abs=1e-4)


def test_requests_on_two_versions_at_once_each_get_their_own_version(gelu_loaded, versions):
    """PEFT's per-row adapters are hooks on shared layers: without the host's lock two threads would decode
    with each other's adapters."""
    host = PeftHost(gelu_loaded.model)
    host.add("v1", versions["v1"])
    host.add("v2", versions["v2"])
    settings = SamplingSettings(**{**FAST, "max_new_tokens": 24})

    def reply(name):
        *_, last = sample_pair(host.version(name), gelu_loaded.tokenizer, PROMPT, settings, (3, 4))
        return [r.token_ids for r in last]

    alone = {name: reply(name) for name in ("v1", "v2")}
    assert alone["v1"] != alone["v2"]
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run(name, index):
        try:
            start.wait()
            results[f"{name}-{index}"] = reply(name)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name, i)) for name in ("v1", "v2") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {f"{name}-{i}": alone[name] for name in ("v1", "v2") for i in range(2)}


def test_the_app_serves_a_version_of_an_unsupported_model_on_the_host(gelu_loaded, versions):
    policy = PolicyHolder(gelu_loaded, per_row_adapters=True)
    v1 = version_snapshot(policy, "v1", versions["v1"])
    v2 = version_snapshot(policy, "v2", versions["v2"])
    assert isinstance(v1.model, HostedVersion) and isinstance(v2.model, HostedVersion)
    assert v1.model.host is v2.model.host is policy.peft_host()
    assert v1.adapter is None  # not on an engine: decoded by sample_pair, as merged versions were
    again = version_snapshot(policy, "v1", versions["v1"])  # the evaluation resolves versions again
    assert len(policy.peft_host().adapters) == 2 and again.model.adapter_name == v1.model.adapter_name
    # Without per-row adapters (no decode loop to share) a version is still a merged copy.
    merged = version_snapshot(PolicyHolder(gelu_loaded), "v1", versions["v1"])
    assert not isinstance(merged.model, HostedVersion)


def test_an_adapter_that_does_not_fit_or_is_not_finite_is_refused_and_the_others_serve_on(
        gelu_loaded, tiny_loaded, versions, tmp_path):
    policy = PolicyHolder(gelu_loaded, per_row_adapters=True)
    v1 = version_snapshot(policy, "v1", versions["v1"])

    def nan_writer(folder):
        lora_writer(gelu_loaded.model, seed=3)(folder)
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "adapter_model.safetensors")
        save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, folder / "adapter_model.safetensors")

    bad = publish(tmp_path, "v3", nan_writer, manifest(gelu_loaded.model_id))
    with pytest.raises(AdapterError, match="non-finite"):
        version_snapshot(policy, "v3", bad)

    # An adapter of another shape: a rank-4 LoRA whose matrices are twice the model's width.
    def wide_writer(folder):
        lora_writer(gelu_loaded.model, seed=4)(folder)
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "adapter_model.safetensors")
        save_file({k: torch.cat([v, v], dim=1 if "lora_A" in k else 0) for k, v in weights.items()},
                  folder / "adapter_model.safetensors")

    wide = publish(tmp_path, "v4", wide_writer, manifest(gelu_loaded.model_id))
    with pytest.raises(AdapterError, match="does not load onto this base model"):
        version_snapshot(policy, "v4", wide)

    assert policy.peft_host().adapters == {v1.model.adapter_name}  # nothing of v3 or v4 stayed
    *_, last = sample_pair(v1.model, gelu_loaded.tokenizer, PROMPT, SamplingSettings(**FAST), (1, 2))
    assert all(r.done for r in last)


def test_a_round_on_an_unsupported_model_goes_live_on_the_host_and_the_chat_streams_it(gelu_loaded, tmp_path):
    """The live loop end to end on the GELU model: a DPO round in its subprocess, the promotion puts v1 on
    the PEFT host (no copy of the weights), the next turn is v1's, and a rollback serves v0 again."""
    from playground.chat import ChatService, ChatSession
    from playground.loop import LoopSettings, TrainingLoop
    from playground.serving.decode_loop import DecodeLoop
    from store import Store
    from tests.test_loop import loop_settings, wait_round

    store = Store(tmp_path / "gelu.db")
    store.ensure_base_version(gelu_loaded.model_id)
    policy = PolicyHolder(gelu_loaded, per_row_adapters=True)
    loop = TrainingLoop(LoopSettings(db=str(tmp_path / "gelu.db"), model=gelu_loaded.model_id,
                                     **loop_settings(tmp_path, enabled=False)), store, policy)
    decode_loop = DecodeLoop()
    service = ChatService(policy, store, decode_loop=decode_loop)
    loop.start()
    try:
        for i in range(8):
            session = ChatSession()
            *_, pair = service.send(session, f"q{i}", SamplingSettings(**FAST))
            service.vote(session, "a")
        loop.train_now()
        run = wait_round(loop)
        assert run["status"] == "succeeded" and run["version"] == "v1"
        live = policy.snapshot()
        assert live.version == "v1" and isinstance(live.model, HostedVersion)
        *_, pair = service.send(ChatSession(), "after the swap", SamplingSettings(**FAST))
        assert pair.version == "v1" and pair.reply_ids
        stored = store.replies_for_turn(pair.turn_id)
        assert {r["policy_version"] for r in stored} == {"v1"}
        loop.rollback("v0")
        *_, pair = service.send(ChatSession(), "after the rollback", SamplingSettings(**FAST))
        assert pair.version == "v0"
    finally:
        loop.shutdown()
        decode_loop.close()
        store.close()


def test_the_host_benchmark_prints_its_keys_on_the_tiny_model(tiny_model_dir, capsys):
    from bench import peft_host

    assert peft_host.main(["--model", str(tiny_model_dir), "--versions", "2", "--tokens", "4", "--repeats", "1",
                           "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["hosted_tokens_match_merged"] is True
    assert result["rss_hosted_versions_vs_v0"] > 0 and result["merged_copy_mb"] > 0
    assert result["hosted_pair_vs_merged_pair"] > 0
