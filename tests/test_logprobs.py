"""The log-prob helper's fused LM head and the trainers' fast LoRA forward, against the plain computations."""

from __future__ import annotations

import copy

import pytest
import torch

import trainers.logprobs as logprobs_mod
from trainers.fastlora import fast_lora
from trainers.logprobs import _HeadLogprobs, _plain_head, token_logprobs


def plain_logprobs(model, ids, mask):
    """The textbook computation: full logits, log-softmax, pick the next token."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return picked[mask[:, 1:]]


def lora_model(model, seed=0, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"])
    policy = get_peft_model(copy.deepcopy(model), config)
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # a fresh adapter is the identity; make it do something
            torch.nn.init.normal_(param, std=0.05)
    return policy


def batch(vocab, rows=3, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, 5:] = True  # the "reply": positions 5..10
    return ids, mask


def lora_grads(policy):
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_head_logprobs_gradients_match_autograd_on_hand_made_tensors():
    # float64 gradcheck of the fused head with a bias, chunked into rows of 2, all three gradients.
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    old = logprobs_mod.HEAD_CHUNK_ROWS
    logprobs_mod.HEAD_CHUNK_ROWS = 2
    try:
        # The fused head returns float32 (its log-sum-exp is float32), so compare values, then gradcheck
        # the same algebra through float64 hand-written autograd.
        got = _HeadLogprobs.apply(hidden, weight, bias, targets)
        expected = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, targets[:, None])[:, 0]
        assert torch.allclose(got.double(), expected, atol=1e-5)
        upstream = torch.randn(5, dtype=torch.float64, generator=g)
        (got.double() * upstream).sum().backward()
        fused = [t.grad.clone() for t in (hidden, weight, bias)]
        for t in (hidden, weight, bias):
            t.grad = None
        (expected * upstream).sum().backward()
        for a, b in zip(fused, (hidden.grad, weight.grad, bias.grad)):
            assert torch.allclose(a, b, atol=1e-5)
    finally:
        logprobs_mod.HEAD_CHUNK_ROWS = old


def test_fused_head_matches_full_logits_values_and_lora_gradients(tiny_loaded, monkeypatch):
    model = tiny_loaded.model
    assert _plain_head(model) is not None  # the tiny Llama takes the fused path
    monkeypatch.setattr(logprobs_mod, "HEAD_CHUNK_ROWS", 4)  # several chunks, the last one short
    policy = lora_model(model)
    ids, mask = batch(model.config.vocab_size)

    fused, rows = token_logprobs(policy, ids, mask)
    fused.sum().backward()
    fused_grads = lora_grads(policy)
    policy.zero_grad()
    expected = plain_logprobs(policy, ids, mask)
    expected.sum().backward()
    assert fused.shape == expected.shape == (3 * 6,)
    assert rows.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert torch.allclose(fused, expected, atol=1e-5)
    for name, grad in lora_grads(policy).items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-5), name


def test_soft_capped_logits_take_the_model_forward(tiny_loaded):
    # A head followed by soft-capping is not a plain head: the helper must use the model's own logits.
    model = copy.deepcopy(tiny_loaded.model)
    model.config.final_logit_softcapping = 30.0
    assert _plain_head(model) is None
    ids, mask = batch(model.config.vocab_size, seed=3)
    got, _ = token_logprobs(model, ids, mask)
    assert torch.allclose(got, plain_logprobs(model, ids, mask), atol=1e-5)


def test_fast_lora_float32_matches_peft_outputs_and_gradients(tiny_loaded):
    policy = lora_model(tiny_loaded.model)
    ids, mask = batch(tiny_loaded.model.config.vocab_size, seed=5)
    expected = plain_logprobs(policy, ids, mask)
    expected.sum().backward()
    expected_grads = lora_grads(policy)
    policy.zero_grad()
    with fast_lora(policy) as patched:
        assert patched == 2 * 3  # 2 layers x q, v, down
        got = plain_logprobs(policy, ids, mask)
        got.sum().backward()
        with policy.disable_adapter():
            base = plain_logprobs(policy, ids, mask)
    assert torch.allclose(got, expected, atol=1e-5)
    for name, grad in lora_grads(policy).items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5), name
    assert torch.allclose(base, plain_logprobs(tiny_loaded.model, ids, mask), atol=1e-5)
    # Afterwards every layer is back on PEFT's own forward.
    lora_layers = [m for m in policy.modules() if hasattr(m, "lora_A")]
    assert lora_layers and not any("forward" in vars(m) or hasattr(m, "_fast_weight") for m in lora_layers)


def test_fast_lora_bfloat16_rounds_only_the_base_products(tiny_loaded):
    policy = lora_model(tiny_loaded.model)
    ids, mask = batch(tiny_loaded.model.config.vocab_size, seed=7)
    expected = plain_logprobs(policy, ids, mask)
    with fast_lora(policy, torch.bfloat16):
        got = plain_logprobs(policy, ids, mask)
        got.sum().backward()
        weights = [m._fast_weight for m in policy.modules() if hasattr(m, "_fast_weight")]
    assert got.dtype == torch.float32 and all(w.dtype == torch.bfloat16 for w in weights)
    # Close to float32 (bf16 keeps 8 bits of mantissa), not equal to it: the rounding did happen.
    assert torch.allclose(got, expected, atol=0.05) and not torch.equal(got, expected)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in trainable)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # the model itself is untouched


@pytest.mark.parametrize("dropout", [0.1])
def test_fast_lora_leaves_layers_with_dropout_to_peft(tiny_loaded, dropout):
    policy = lora_model(tiny_loaded.model, dropout=dropout)
    with fast_lora(policy) as patched:
        assert patched == 0


def test_training_env_adds_the_malloc_tunables_once_and_passive_openmp():
    from trainers.procenv import TRAINING_MALLOC_TUNABLES, training_env

    env = training_env({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == TRAINING_MALLOC_TUNABLES and env["PATH"] == "/bin"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert training_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"  # a user's choice stands
    assert "OMP_WAIT_POLICY" not in training_env({}, passive_openmp=False)  # a benchmark alone on the CPU
    kept = training_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TRAINING_MALLOC_TUNABLES}"
    assert training_env(kept) == kept  # idempotent
