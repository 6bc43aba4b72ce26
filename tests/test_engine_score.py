"""Engine.score (the logits at every position, teacher forced) against the HF forward and HF + PEFT,
on the tiny random Llama (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from playground.serving import engine as engine_mod
from tests.test_engine import build
from tests.test_engine_lora import base, peft_v1, random_peft  # noqa: F401 - fixtures

BACKENDS = ["torch", "native"]
SEQUENCE = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 2, 31, 77]
RTOL = 1e-5


def hf_all_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def assert_close(got, expected):
    assert got.shape == expected.shape and got.dtype == torch.float32
    scale = expected.abs().max()
    diff = (got - expected).abs().max()
    assert diff <= RTOL * scale, f"max diff {diff:.2e} of {scale:.1f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_matches_hf_at_every_position(base, backend):
    engine = build(base, backend)
    expected = hf_all_logits(base, SEQUENCE)
    assert_close(engine.score(SEQUENCE), expected)
    start = 6  # e.g. a prompt of 7 tokens: the rows that predict the reply
    assert_close(engine.score(SEQUENCE, start=start), expected[start:])
    # The last row is prefill's logits, to the bit: one computation, two views of it.
    _, last = engine.prefill(SEQUENCE, 1, len(SEQUENCE))
    assert torch.equal(engine.score(SEQUENCE, start=len(SEQUENCE) - 1), last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_with_an_adapter_matches_peft(base, peft_v1, backend):
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    expected = hf_all_logits(peft_v1, SEQUENCE)
    assert_close(engine.score(SEQUENCE, adapter="v1", start=3), expected[3:])
    # The base rows are still the base model's, and the adapter really moves them.
    with peft_v1.disable_adapter():
        plain = hf_all_logits(peft_v1, SEQUENCE)
    assert_close(engine.score(SEQUENCE, start=3), plain[3:])
    assert (plain - expected).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_branches_share_the_prefix_and_match_scoring_each_alone(base, peft_v1, backend):
    engine = build(base, backend)
    engine.add_adapter("v1", peft_v1)
    prefix, branches = SEQUENCE[:5], [SEQUENCE[5:], [9, 8, 7], [], SEQUENCE[5:9]]
    for adapter, model in ((None, None), ("v1", peft_v1)):
        got = engine.score_branches(prefix, branches, adapter=adapter)
        assert len(got) == len(branches)
        for branch, logits in zip(branches, got):
            alone = engine.score(prefix + branch, adapter=adapter, start=len(prefix) - 1)
            assert_close(logits, alone)
            if model is not None:
                assert_close(logits, hf_all_logits(model, prefix + branch)[len(prefix) - 1:])
    with pytest.raises(ValueError, match="empty prefix"):
        engine.score_branches([], [[1, 2]])


def test_score_past_the_packed_prefill_rows(base, monkeypatch):
    # Longer sequences unpack the weights for MKL (prefill's path too): the same logits.
    engine = build(base, "native")
    monkeypatch.setattr(engine_mod, "NATIVE_PREFILL_MAX_ROWS", 4)
    assert_close(engine.score(SEQUENCE, start=2), hf_all_logits(base, SEQUENCE)[2:])


def test_score_refuses_bad_input(base):
    engine = build(base, "torch")
    with pytest.raises(ValueError, match="empty"):
        engine.score([])
    with pytest.raises(ValueError, match="start"):
        engine.score(SEQUENCE, start=len(SEQUENCE))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.score([1, base.config.vocab_size])
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.score(SEQUENCE, adapter="nope")
