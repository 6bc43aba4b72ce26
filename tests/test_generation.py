"""Pair sampling on the tiny random Llama: seeds, provenance, and log-probs checked by a forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from playground.serving.generation import SamplingSettings, filter_top_p, sample_pair
from playground.serving.prompting import build_prompt, render
from trainers.logprobs import reply_mask, sequence_logprobs


def run_pair(loaded, prompt_ids, settings, seeds, stop_ids=None):
    last = None
    steps = 0
    for replies in sample_pair(loaded.model, loaded.tokenizer, prompt_ids, settings, seeds, stop_ids=stop_ids):
        last = [r for r in replies]
        steps += 1
    return last, steps


@pytest.fixture
def prompt_ids(tiny_loaded):
    return render(tiny_loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])


def test_two_replies_with_their_own_seeds_and_full_provenance(tiny_loaded, prompt_ids):
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=24)
    (a, b), steps = run_pair(tiny_loaded, prompt_ids, settings, (11, 12))
    assert (a.slot, a.seed, b.slot, b.seed) == ("a", 11, "b", 12)
    assert a.token_ids != b.token_ids  # a random 384-token model at T=1: equal draws are astronomically rare
    for r in (a, b):
        assert r.finish_reason in ("stop", "length")
        assert 1 <= r.n_tokens <= 24
        assert math.isfinite(r.logprob_sum) and r.logprob_sum < 0
        assert 0 < r.ttft_s <= r.latency_s
    assert steps == max(a.n_tokens, b.n_tokens)  # streamed: one update per decode step


def test_a_seed_reproduces_its_reply(tiny_loaded, prompt_ids):
    settings = SamplingSettings(temperature=0.9, top_p=0.9, max_new_tokens=16)
    (a1, b1), _ = run_pair(tiny_loaded, prompt_ids, settings, (5, 6))
    (a2, _), _ = run_pair(tiny_loaded, prompt_ids, settings, (5, 99))
    (_, b3), _ = run_pair(tiny_loaded, prompt_ids, settings, (1, 6))
    assert a1.token_ids == a2.token_ids
    assert b1.token_ids == b3.token_ids


def test_logprob_sum_equals_a_forward_pass_at_temperature_one(tiny_loaded, prompt_ids):
    # Sampled at T=0.7 with top-p, but scored under the unfiltered T=1 distribution, as stored.
    settings = SamplingSettings(temperature=0.7, top_p=0.8, max_new_tokens=20)
    replies, _ = run_pair(tiny_loaded, prompt_ids, settings, (3, 4))
    for r in replies:
        ids = torch.tensor([prompt_ids + r.token_ids])
        with torch.no_grad():
            recomputed = sequence_logprobs(tiny_loaded.model, ids, reply_mask(len(prompt_ids), ids.shape[1]))
        assert recomputed.item() == pytest.approx(r.logprob_sum, abs=1e-3)


def test_length_limit_and_end_of_turn(tiny_loaded, prompt_ids):
    (a, b), _ = run_pair(tiny_loaded, prompt_ids, SamplingSettings(max_new_tokens=5), (1, 2), stop_ids=set())
    assert (a.finish_reason, a.n_tokens, b.finish_reason, b.n_tokens) == ("length", 5, "length", 5)
    every_token = set(range(len(tiny_loaded.tokenizer)))
    (a, b), steps = run_pair(tiny_loaded, prompt_ids, SamplingSettings(max_new_tokens=5), (1, 2), every_token)
    assert (a.finish_reason, a.n_tokens, a.text, steps) == ("stop", 1, "", 1)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]]))
    kept = filter_top_p(logits, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, True, False, False]]
    assert filter_top_p(logits, 1.0).isfinite().all()


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": 3}, {"top_p": 0}, {"max_new_tokens": 0},
                                    {"max_new_tokens": 100_000}])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingSettings(**kwargs)


def test_prompt_drops_oldest_exchanges_and_says_so(tiny_loaded):
    tok = tiny_loaded.tokenizer
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "ok " * 20}]
    full = len(render(tok, history + [{"role": "user", "content": "last"}]))
    prompt = build_prompt(tok, "", history, "last", max_prompt_tokens=full // 2)
    assert len(prompt.ids) <= full // 2
    assert prompt.messages[-1] == {"role": "user", "content": "last"}
    assert prompt.messages[0]["role"] == "user" and prompt.messages[0]["content"].startswith("question")
    assert any("oldest exchange" in n for n in prompt.notes)


def test_overlong_message_is_cut_for_the_model_with_a_note(tiny_loaded):
    from playground.serving.limits import MAX_MESSAGE_CHARS

    huge = "line\n" * 10_000
    prompt = build_prompt(tiny_loaded.tokenizer, "be brief", [], huge, max_prompt_tokens=400)
    assert len(prompt.ids) <= 400
    assert prompt.messages[0] == {"role": "system", "content": "be brief"}
    assert len(prompt.messages[-1]["content"]) < MAX_MESSAGE_CHARS
    assert any("first 8,000" in n for n in prompt.notes) and any("shortened" in n for n in prompt.notes)


def test_a_draw_follows_each_rows_distribution_never_picks_a_masked_token_and_depends_only_on_its_seed():
    from playground.serving.generation import _draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [0.1, 0.0, 0.0, 0.0, 0.9]])
    draws = 20_000
    g = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    counts = torch.zeros(2, 5)
    for _ in range(draws):
        tokens = _draw(probs, g)
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
    assert counts[0, 0] == counts[0, 2] == counts[1, 1] == counts[1, 2] == counts[1, 3] == 0
    # Each share within 4 standard errors of its probability (a wrong mapping is off by far more).
    for row in range(2):
        for token in range(5):
            p = float(probs[row, token])
            if p:
                assert abs(float(counts[row, token]) / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)
    # A row's token depends on its generator alone, not on which rows it shares the step with.
    alone = [int(_draw(probs[1:], [torch.Generator().manual_seed(s)])[0]) for s in range(50)]
    shared = [int(_draw(probs, [torch.Generator().manual_seed(99), torch.Generator().manual_seed(s)])[1])
              for s in range(50)]
    assert alone == shared and len(set(alone)) == 2
