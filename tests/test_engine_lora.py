"""Per-row LoRA in the decode engine against HF + PEFT, on the tiny random Llama (nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

from playground.serving import engine as engine_mod
from playground.serving.engine import AdapterUnsupported, Engine, read_adapter
from tests.test_engine import build
from trainers.dpo import DPOConfig
from trainers.runtime import ALL_LINEAR

BACKENDS = ["torch", "native"]
PROMPT = [5, 17, 42, 99, 3, 250, 7]
STEPS = 8
# Random LoRA weights of this size move the tiny model's logits by O(1): a missed or misplaced update
# (a wrong permutation, scale or segment) fails by far more than the tolerance.
LORA_STD = 0.1


def lora_config(**overrides):
    """The LoraConfig trainers/dpo.py builds from its defaults."""
    from peft import LoraConfig

    cfg = DPOConfig()
    kwargs = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def random_peft(base, seed: int, **overrides):
    """A PeftModel on a copy of base whose LoRA A and B are random (a fresh adapter is the identity)."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), lora_config(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_STD)
    return model.eval()


@pytest.fixture(scope="module")
def base(tiny_loaded):
    model = copy.deepcopy(tiny_loaded.model).float().eval()
    with torch.no_grad():  # random init leaves the norms at 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


@pytest.fixture(scope="module")
def peft_v1(base):
    return random_peft(base, seed=1)


@pytest.fixture(scope="module")
def peft_v2(base):
    return random_peft(base, seed=2)


def feeds(vocab: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (STEPS, rows), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, prompt, feed):
    """HF (or PEFT) logits after the prompt, then after each token of feed [steps, 1]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for tokens in feed:
            out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
    return logits


def engine_logits(engine, prompt, feed, adapter=None):
    state, logits = engine.prefill(prompt, feed.shape[1], len(prompt) + len(feed), adapter=adapter)
    out = [logits]
    for tokens in feed:
        out.append(engine.decode_many([state], tokens))
    return out


def assert_close(got, expected, rtol=1e-5):
    for step, (a, e) in enumerate(zip(got, expected)):
        scale = e.abs().max()
        assert (a - e).abs().max() <= rtol * scale, f"step {step}: max diff {(a - e).abs().max():.2e} of {scale:.1f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_row_matches_peft(base, peft_v1, backend):
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    feed = feeds(base.config.vocab_size)
    expected = hf_logits(peft_v1, PROMPT, feed)
    assert_close(engine_logits(engine, PROMPT, feed, adapter="v1"), expected)
    # The update is real: the base model's logits are far from the adapter's.
    with peft_v1.disable_adapter():
        plain = hf_logits(peft_v1, PROMPT, feed)
    assert (plain[-1] - expected[-1]).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_from_folder_and_partial_targets(base, backend, tmp_path):
    # Only q, v and down: k, o, gate and up get zero blocks or none, and must stay as the base.
    partial = random_peft(base, seed=3, target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    partial.save_pretrained(tmp_path)
    engine = build(base, backend)
    adapter = engine.add_adapter("partial", *read_adapter(tmp_path))
    assert adapter.targets == {"q_proj", "v_proj", "down_proj"}
    assert all(layer[1] is None and layer[2] is None for layer in adapter.mats)  # o, gate/up untouched
    feed = feeds(base.config.vocab_size, seed=3)
    assert_close(engine_logits(engine, PROMPT, feed, adapter="partial"), hf_logits(partial, PROMPT, feed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_each_state_alone(base, peft_v1, peft_v2, backend):
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    engine.add_adapter("v2", peft_v2)
    names = [None, "v1", "v2", "v1"]  # v1 twice: its rows are not contiguous in the batch
    prompts = [PROMPT, PROMPT[:4], [9, 8, 7, 6, 5], PROMPT[2:]]
    rows = [2, 1, 2, 1]
    g = torch.Generator().manual_seed(4)
    feed = [torch.randint(0, base.config.vocab_size, (STEPS, r), generator=g) for r in rows]

    alone = []
    for prompt, name, f in zip(prompts, names, feed):
        state, _ = engine.prefill(prompt, f.shape[1], len(prompt) + STEPS, adapter=name)
        alone.append([engine.decode_many([state], tokens) for tokens in f])
    states = [engine.prefill(p, r, len(p) + STEPS, adapter=n)[0] for p, r, n in zip(prompts, rows, names)]
    for step in range(STEPS):
        together = engine.decode_many(states, torch.cat([f[step] for f in feed])).split(rows)
        for i, got in enumerate(together):
            if backend == "native":  # every row computed by the same arithmetic whatever its neighbours
                assert torch.equal(got, alone[i][step]), f"state {i} step {step}"
            else:
                assert_close([got], [alone[i][step]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_copy_gives_the_adapter_rows_logits(base, peft_v1, backend):
    merged = copy.deepcopy(peft_v1).merge_and_unload().eval()
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    feed = feeds(base.config.vocab_size, rows=2, seed=5)
    assert_close(engine_logits(engine, PROMPT, feed, adapter="v1"), engine_logits(build(merged, backend), PROMPT, feed))


@pytest.mark.parametrize("overrides, reason", [
    (dict(use_dora=True), "use_dora"),
    (dict(bias="lora_only"), "bias"),
    (dict(use_rslora=True), "use_rslora"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
])
def test_unsupported_adapters_are_refused(base, overrides, reason):
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), lora_config(**overrides))
    engine = Engine.from_model(base, native=False)
    with pytest.raises(AdapterUnsupported, match=reason):
        engine.add_adapter("bad", model)
    assert engine.adapters == {}


def test_add_remove_and_bad_input(base, peft_v1):
    from peft.utils import get_peft_model_state_dict

    engine = Engine.from_model(base, native=False)
    adapter = engine.add_adapter("v1", peft_v1)
    # Per layer (r=16, alpha=32, all 7 modules): A and B of each module, nothing more.
    lora_params = sum(p.numel() for n, p in peft_v1.named_parameters() if "lora_" in n)
    assert adapter.nbytes == lora_params * 4 and adapter.rank == 16 and adapter.scaling == 2.0
    with pytest.raises(ValueError, match="already loaded"):
        engine.add_adapter("v1", peft_v1)
    state_dict = get_peft_model_state_dict(peft_v1)
    with pytest.raises(ValueError, match="LoraConfig"):
        engine.add_adapter("v1b", state_dict)
    wrong = dict(state_dict)
    key = next(k for k in wrong if "lora_A" in k)
    wrong[key] = wrong[key][:, :-1]
    with pytest.raises(ValueError, match="another base model"):
        engine.add_adapter("v1b", wrong, lora_config())
    engine.remove_adapter("v1")
    assert "v1" not in engine.adapters
    with pytest.raises(KeyError):
        engine.remove_adapter("v1")
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.prefill(PROMPT, 1, 20, adapter="v1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_adapter_raises_before_anything_advances(base, peft_v1, backend):
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    a, _ = engine.prefill(PROMPT, 1, 20, adapter="v1")
    b, _ = engine.prefill(PROMPT, 1, 20)
    n = len(PROMPT)
    with torch.inference_mode():  # the position a step would write: unset memory (maybe NaN) until then
        a.keys[:, :, :, n] = 0
    keys = a.keys[:, :, :, :n + 1].clone()
    tokens = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.decode_many([a, b], tokens, adapters=["v1", "v9"])
    with pytest.raises(ValueError, match="one .or None. per state"):
        engine.decode_many([a, b], tokens, adapters=["v1"])
    engine.remove_adapter("v1")  # a state whose adapter went away
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.decode_many([a, b], tokens)
    assert a.length == b.length == n and torch.equal(a.keys[:, :, :, :n + 1], keys)
    engine.decode_many([a, b], tokens, adapters=[None, None])  # the base still runs
    assert a.length == len(PROMPT) + 1


def test_dpo_targets_are_the_engine_modules():
    # The engine refuses other modules: the trainer's default must stay within them.
    assert set(ALL_LINEAR) == set(engine_mod.LORA_MODULES)


def bf16_valued(model):
    """The PeftModel with its LoRA values rounded to bfloat16 (float32 tensors): what a trainer saves."""
    from trainers.runtime import round_adapter_to_bf16

    model = copy.deepcopy(model)
    round_adapter_to_bf16(model)
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_valued_adapter_is_stored_at_half_and_matches_peft(base, peft_v1, backend):
    rounded = bf16_valued(peft_v1)
    engine = build(base, backend)
    exact = engine.add_adapter("v1", peft_v1)
    half = engine.add_adapter("v1h", rounded)
    lora_params = sum(p.numel() for n, p in rounded.named_parameters() if "lora_" in n)
    # Kept as bfloat16 because that loses nothing; the float32 adapter is kept as it came.
    assert half.nbytes == lora_params * 2 and exact.nbytes == lora_params * 4
    assert all(t.dtype == torch.bfloat16 for layer in half.mats for pair in layer if pair for t in pair)
    feed = feeds(base.config.vocab_size, seed=6)
    assert_close(engine_logits(engine, PROMPT, feed, adapter="v1h"), hf_logits(rounded, PROMPT, feed))
    # Rounding really changed the adapter (so the match above is not the float32 adapter's).
    assert (engine_logits(engine, PROMPT, feed, adapter="v1")[-1]
            - engine_logits(engine, PROMPT, feed, adapter="v1h")[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_and_float32_adapters_mix_in_one_batch(base, peft_v1, peft_v2, backend):
    engine = build(base, backend)
    engine.add_adapter("f32", peft_v1)
    engine.add_adapter("half", bf16_valued(peft_v2))
    names = ["half", None, "f32", "half"]
    prompts = [PROMPT, PROMPT[:5], PROMPT[1:], [4, 4, 2]]
    g = torch.Generator().manual_seed(8)
    feed = [torch.randint(0, base.config.vocab_size, (STEPS, 1), generator=g) for _ in names]
    alone = []
    for prompt, name, f in zip(prompts, names, feed):
        state, _ = engine.prefill(prompt, 1, len(prompt) + STEPS, adapter=name)
        alone.append([engine.decode_many([state], tokens) for tokens in f])
    states = [engine.prefill(p, 1, len(p) + STEPS, adapter=n)[0] for p, n in zip(prompts, names)]
    for step in range(STEPS):
        together = engine.decode_many(states, torch.cat([f[step] for f in feed])).split(1)
        for i, got in enumerate(together):
            if backend == "native":
                assert torch.equal(got, alone[i][step]), f"state {i} step {step}"
            else:
                assert_close([got], [alone[i][step]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adapter", [None, "v1"])
def test_a_kept_prefix_prefills_only_the_new_tokens_and_matches_a_whole_prefill(base, peft_v1, backend, adapter):
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    # Turn 1: a pair, each row fed its own tokens by decode steps.
    state, _ = engine.prefill(PROMPT, 2, len(PROMPT) + STEPS, adapter=adapter)
    feed = feeds(base.config.vocab_size, rows=2, seed=9)
    for tokens in feed:
        engine.decode_many([state], tokens)
    reply = feed[:, 1].tolist()  # row 1's tokens: the reply the next turn continues
    kept = engine.keep_prefix(state, 1, PROMPT + reply)
    assert kept.keys.shape[2] == len(PROMPT) + STEPS and kept.adapter == adapter
    # Turn 2: the conversation so far plus a new message.
    prompt = PROMPT + reply + [11, 12, 13]
    fresh, fresh_logits = engine.prefill(prompt, 2, len(prompt) + 4, adapter=adapter)
    reused, reused_logits = engine.prefill(prompt, 2, len(prompt) + 4, adapter=adapter, prefix=kept)
    assert (fresh.reused, reused.reused) == (0, len(PROMPT) + STEPS)
    assert_close([reused_logits], [fresh_logits])
    for tokens in feeds(base.config.vocab_size, rows=2, seed=10)[:4]:
        assert_close([engine.decode_many([reused], tokens)], [engine.decode_many([fresh], tokens)])
    # A prompt that is all prefix still computes its last token; one that shares nothing reuses nothing.
    whole, whole_logits = engine.prefill(PROMPT + reply, 1, len(PROMPT) + STEPS + 1, adapter=adapter, prefix=kept)
    assert whole.reused == len(PROMPT) + STEPS - 1
    assert_close([whole_logits], [engine.prefill(PROMPT + reply, 1, len(PROMPT) + STEPS + 1, adapter=adapter)[1]])
    assert engine.prefill([7] + PROMPT, 1, 20, adapter=adapter, prefix=kept)[0].reused == 0
    # Keys of another adapter (or engine) are never mixed in.
    with pytest.raises(ValueError, match="another engine or adapter"):
        engine.prefill(prompt, 1, len(prompt) + 1, adapter="v1" if adapter is None else None, prefix=kept)
    with pytest.raises(ValueError, match="another engine or adapter"):
        build(base, backend).prefill(prompt, 1, len(prompt) + 1, prefix=engine.keep_prefix(fresh, 0, prompt[:3]))
