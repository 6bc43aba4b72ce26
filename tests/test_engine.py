"""The decode engine against the HF forward, on tiny random models built here (nothing downloaded)."""

from __future__ import annotations

import platform
import subprocess

import pytest
import torch

from playground.serving import engine as engine_mod
from playground.serving.engine import native as native_mod
from playground.serving.engine import Engine, supports
from playground.serving.generation import SamplingSettings, engine_for, sample_pair

BACKENDS = ["torch", "native"]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()
    _roughen_norms(model)
    return model


def _roughen_norms(model):
    # Random init leaves the RMSNorm weights at 1 and biases at 0: make them matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_untied():
    return tiny_llama(seed=1, tie_word_embeddings=False)


def require_native():
    # A skip, not a quiet pass: on a machine without the native backend its checks did not run.
    if engine_mod.native_library() is None:
        pytest.skip("the native backend needs x86-64 Linux with AVX-512 and a C compiler; "
                    f"here: {engine_mod._native_error}")


def build(model, backend: str) -> Engine:
    if backend == "native":
        require_native()
    engine = Engine.from_model(model, native=backend == "native")
    assert engine.backend == backend
    return engine


def hf_steps(model, prompt, feeds):
    """HF logits after the prompt (repeated for each row), then after each row of `feeds` [steps, rows]."""
    rows = feeds.shape[1]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(rows)
        logits = [out.logits[:, -1].expand(rows, -1)]
        for tokens in feeds:
            out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
    return logits


def engine_steps(engine, prompt, feeds, many=False):
    """Engine logits after the prompt, then after each row of `feeds`; many: through decode_many([state])."""
    state, logits = engine.prefill(prompt, feeds.shape[1], len(prompt) + len(feeds))
    out = [logits]
    for tokens in feeds:
        out.append(engine.decode_many([state], tokens) if many else engine.decode(state, tokens))
    return out


def assert_same_logits(model, engine, prompt, rows=2, steps=6, seed=0, many=False):
    g = torch.Generator().manual_seed(seed)
    feeds = torch.randint(0, model.config.vocab_size, (steps, rows), generator=g)
    expected = hf_steps(model, prompt, feeds)
    got = engine_steps(engine, prompt, feeds, many)
    for step, (e, a) in enumerate(zip(expected, got)):
        assert a.shape == e.shape and a.dtype == torch.float32
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-5), f"step {step}: max diff {(a - e).abs().max():.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf_prefill_and_decode(llama, backend):
    engine = build(llama, backend)
    assert_same_logits(llama, engine, [5, 17, 42, 99, 3, 250, 7], rows=2, steps=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf_untied_one_row_three_rows_and_a_long_prompt(llama_untied, backend, monkeypatch):
    engine = build(llama_untied, backend)
    assert not engine.tied
    assert_same_logits(llama_untied, engine, [1, 2, 3], rows=1, steps=4)
    assert_same_logits(llama_untied, engine, [9, 8, 7, 6], rows=3, steps=4, seed=1)
    long_prompt = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    monkeypatch.setattr(engine_mod, "NATIVE_PREFILL_MAX_ROWS", 16)  # the unpacked (MKL) prefill too
    assert_same_logits(llama_untied, engine, long_prompt, rows=2, steps=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_biases_and_mistral(backend):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(3)
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    mistral = MistralForCausalLM(MistralConfig(**common, sliding_window=None, head_dim=32)).eval()
    for model in (qwen, mistral):
        _roughen_norms(model)
        assert supports(model)
        assert_same_logits(model, build(model, backend), [3, 1, 4, 1, 5], rows=2, steps=4)


def test_unsupported_configs_fall_back(llama):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert supports(llama)
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    scaled = tiny_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}, **small)
    assert not supports(scaled)
    assert not supports(tiny_llama(hidden_act="gelu", **small))
    assert not supports(MistralForCausalLM(MistralConfig(**small, sliding_window=16)))
    assert not supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    with pytest.raises(ValueError):
        Engine.from_model(scaled)
    # A LoRA-style wrapper in place of a Linear: the engine would miss the adapter.
    wrapped = tiny_llama(**small)
    wrapped.model.layers[0].self_attn.q_proj = torch.nn.Sequential(wrapped.model.layers[0].self_attn.q_proj)
    assert not supports(wrapped)


def test_the_engine_is_a_snapshot(llama):
    model = tiny_llama(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine.from_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    state, first = engine.prefill([1, 2, 3], 2, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    _, again = engine.prefill([1, 2, 3], 2, 8)
    assert torch.equal(first, again)  # later changes to the model do not reach the engine


def test_engine_cache_per_model_and_rebuilt_after_in_place_change():
    model = tiny_llama(seed=5)
    first = engine_for(model)
    assert first is not None and engine_for(model) is first
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.01)
    rebuilt = engine_for(model)
    assert rebuilt is not first
    assert engine_for(tiny_llama(seed=5, hidden_act="gelu")) is None


class _Tokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("top_p,temperature", [(1.0, 1.0), (0.9, 0.7)])
def test_sample_pair_gives_the_same_tokens_with_and_without_the_engine(llama, top_p, temperature):
    settings = SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=24)
    prompt = [5, 17, 42, 99, 3]
    runs = {}
    for use_engine in (False, None):
        last = None
        for replies in sample_pair(llama, _Tokenizer(), prompt, settings, (7, 8), stop_ids={11},
                                   use_engine=use_engine):
            last = replies
        runs[use_engine] = last
    assert engine_for(llama) is not None
    hf, eng = runs[False], runs[None]
    for a, b in zip(hf, eng):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
    assert hf[0].token_ids != hf[1].token_ids


def test_decode_refuses_a_full_cache_and_bad_tokens(llama):
    engine = Engine.from_model(llama)
    state, _ = engine.prefill([1, 2], 2, 3)
    engine.decode(state, torch.tensor([4, 5]))
    with pytest.raises(ValueError):
        engine.decode(state, torch.tensor([4, 5]))
    with pytest.raises(ValueError):
        engine.prefill([1, 2, 300], 2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_refuses_a_token_outside_the_vocabulary(llama, backend):
    engine = build(llama, backend)
    state, _ = engine.prefill([1, 2], 2, 8)
    for bad in (300, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.decode(state, torch.tensor([4, bad]))
    assert state.length == 2


# ---- decode_many: rows of several requests, each at its own position, in one step

def decode_schedule(engine, requests, steps, batched):
    """Logits per request and step, each request a dict(prompt, rows, feeds [its steps, rows], join).

    batched: all the requests active at a step go through one decode_many call (a request joins at
    step `join`, prefilled then, and leaves when its feeds run out); else each is decoded alone.
    """
    states, out = {}, {i: [] for i in range(len(requests))}
    for step in range(steps):
        for i, req in enumerate(requests):
            if req["join"] == step:  # the prefill's own logits are compared by the other tests
                states[i], _ = engine.prefill(req["prompt"], req["rows"], len(req["prompt"]) + req["room"])
        active = [i for i, req in enumerate(requests) if req["join"] <= step < req["join"] + len(req["feeds"])]
        if not active:
            continue
        feeds = [requests[i]["feeds"][step - requests[i]["join"]] for i in active]
        if batched:
            logits = engine.decode_many([states[i] for i in active], torch.cat(feeds))
            chunks = logits.split([requests[i]["rows"] for i in active])
        else:
            chunks = [engine.decode(states[i], t) for i, t in zip(active, feeds)]
        for i, chunk in zip(active, chunks):
            out[i].append(chunk)
    for i, req in enumerate(requests):
        assert states[i].length == len(req["prompt"]) + len(req["feeds"])
    return out


def make_requests(vocab, specs, seed=0):
    """specs: (prompt length, rows, steps, join step, spare positions) per request."""
    g = torch.Generator().manual_seed(seed)
    return [dict(prompt=torch.randint(0, vocab, (n,), generator=g).tolist(), rows=rows, join=join,
                 feeds=torch.randint(0, vocab, (steps, rows), generator=g), room=steps + spare)
            for n, rows, steps, join, spare in specs]


def assert_batched_matches_alone(model, engine, requests, steps):
    together = decode_schedule(engine, requests, steps, batched=True)
    alone = decode_schedule(engine, requests, steps, batched=False)
    for i, req in enumerate(requests):
        assert len(together[i]) == len(alone[i]) == len(req["feeds"])
        for step, (a, b) in enumerate(zip(together[i], alone[i])):
            assert a.shape == (req["rows"], model.config.vocab_size) and a.dtype == torch.float32
            if engine.backend == "native":  # the same arithmetic for a row whatever its neighbours
                assert torch.equal(a, b), f"request {i} step {step}: max diff {(a - b).abs().max():.2e}"
            else:  # batched matmuls may sum in another order
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"request {i} step {step}"
        # And against the HF forward of that request alone (its first entry is the prefill's logits).
        expected = hf_steps(model, req["prompt"], req["feeds"])[1:]
        for step, (a, e) in enumerate(zip(together[i], expected)):
            assert torch.allclose(a, e, atol=1e-5, rtol=1e-5), f"request {i} step {step} vs HF"


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_many_gives_each_request_its_logits_alone(tiny_loaded, backend):
    model = tiny_loaded.model
    engine = build(model, backend)
    # 2, 1 and 3 rows at positions 7, 3 and 20 with their own max_total_len: the 1-row request sits
    # between the others, so the kernel pairs its row with a row of another request.
    requests = make_requests(model.config.vocab_size, [(7, 2, 10, 0, 0), (3, 1, 10, 0, 5), (20, 3, 10, 0, 1)])
    assert_batched_matches_alone(model, engine, requests, steps=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_many_with_requests_joining_and_leaving(tiny_loaded, backend):
    model = tiny_loaded.model
    engine = build(model, backend)
    # The first leaves after step 5 (dropped from the list at step 6); the third joins at step 4.
    requests = make_requests(model.config.vocab_size, [(5, 2, 6, 0, 0), (9, 1, 10, 0, 2), (4, 3, 6, 4, 3)],
                             seed=1)
    assert_batched_matches_alone(model, engine, requests, steps=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_many_of_one_state_matches_hf(llama, backend):
    engine = build(llama, backend)
    assert_same_logits(llama, engine, [5, 17, 42, 99, 3, 250, 7], rows=2, steps=8, many=True)
    assert_same_logits(llama, engine, [9, 8], rows=1, steps=4, seed=1, many=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_many_refuses_bad_steps_and_advances_nothing(llama, backend):
    engine = build(llama, backend)
    a, _ = engine.prefill([1, 2, 3], 2, 8)
    b, _ = engine.prefill([4], 1, 2)
    full, _ = engine.prefill([5, 6], 1, 2)
    foreign, _ = build(llama, backend).prefill([1, 2, 3], 2, 8)
    ok = torch.tensor([7, 8, 9])
    cases = [
        ([], torch.tensor([], dtype=torch.long), "at least one state"),
        ([a, foreign], torch.tensor([7, 8, 9, 10]), "not made by this engine"),
        ([a, a], torch.tensor([7, 8, 9, 10]), "listed twice"),
        ([a, full], ok, "cache is full"),
        ([a, b], torch.tensor([7, 8]), "expected 3 token ids"),
        ([a, b], torch.tensor([7.0, 8.0, 9.0]), "expected 3 token ids"),
        ([a, b], torch.tensor([7, 300, 9]), "outside the vocabulary"),
    ]
    for states, tokens, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.decode_many(states, tokens)
    assert (a.length, b.length, full.length, foreign.length) == (3, 1, 2, 3)
    # The refused steps left the states usable: a good step still gives what decoding alone gives.
    got = engine.decode_many([a, b], ok)
    a2, _ = engine.prefill([1, 2, 3], 2, 8)
    b2, _ = engine.prefill([4], 1, 2)
    alone = torch.cat([engine.decode(a2, ok[:2]), engine.decode(b2, ok[2:])])
    assert torch.allclose(got, alone, atol=1e-5, rtol=1e-5)
    assert (a.length, b.length) == (4, 2)


def test_native_engine_step_is_the_one_request_case_of_engine_step_rows(llama):
    import ctypes

    engine = build(llama, "native")
    tokens = torch.tensor([11, 12])
    via_rows, _ = engine.prefill([5, 17, 42], 2, 6)
    via_step, _ = engine.prefill([5, 17, 42], 2, 6)
    expected = engine.decode(via_rows, tokens)
    logits = torch.empty_like(expected)
    rc = engine._lib.engine_step(ctypes.addressof(engine._desc), tokens.data_ptr(), 2, via_step.length,
                                 via_step.keys.data_ptr(), via_step.values.data_ptr(), via_step.max_total_len,
                                 logits.data_ptr(), torch.get_num_threads())
    assert rc == 0 and torch.equal(logits, expected)
    assert torch.equal(via_step.keys[:, :, :, :4], via_rows.keys[:, :, :, :4])
    assert torch.equal(via_step.values[:, :, :, :4], via_rows.values[:, :, :, :4])


def test_native_sampling_probs_match_top_p_filtering():
    from playground.serving.generation import filter_top_p

    require_native()
    g = torch.Generator().manual_seed(0)
    for vocab, temperature, top_p, scale in [(300, 0.8, 0.95, 3.0), (5000, 1.0, 1.0, 1.0), (5000, 0.5, 0.5, 0.3),
                                             (5000, 1.5, 0.99, 5.0), (300, 0.7, 0.01, 1.0)]:
        logits = torch.randn(2, vocab, generator=g) * scale
        probs, lse = engine_mod.native_sampling_probs(logits, temperature, top_p)
        expected = filter_top_p(logits.double() / temperature, top_p).softmax(-1).float()
        assert torch.equal(probs > 0, expected > 0)
        assert torch.allclose(probs, expected, atol=1e-6, rtol=1e-4)
        assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)


def test_bfloat16_runs_on_the_torch_backend_within_rounding():
    model = tiny_llama(seed=6).to(torch.bfloat16)
    engine = Engine.from_model(model)
    assert engine.backend == "torch" and engine.dtype == torch.bfloat16
    feeds = torch.randint(0, 300, (4, 2), generator=torch.Generator().manual_seed(0))
    for expected, got in zip(hf_steps(model, [5, 17, 42, 99], feeds), engine_steps(engine, [5, 17, 42, 99], feeds)):
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected.float(), atol=2e-2)


def test_concurrent_pairs_get_the_same_tokens_as_one_after_the_other(llama):
    import threading

    settings = SamplingSettings(temperature=0.9, top_p=0.95, max_new_tokens=16)

    def run(seeds, out, key):
        last = None
        for replies in sample_pair(llama, _Tokenizer(), [5, 17, 42], settings, seeds, stop_ids=set()):
            last = replies
        out[key] = [r.token_ids for r in last]

    alone, together = {}, {}
    for key, seeds in (("x", (1, 2)), ("y", (3, 4))):
        run(seeds, alone, key)
    jobs = (("x", (1, 2)), ("y", (3, 4)))
    threads = [threading.Thread(target=run, args=(seeds, together, key)) for key, seeds in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


WARNING_FLAGS = ("-Wall", "-Wextra", "-Werror")


def test_native_source_compiles_without_warnings(tmp_path):
    compiler = native_mod.c_compiler()
    if compiler is None:
        pytest.skip("no C compiler ($CC, cc or gcc) to build native.c with")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"native.c is AVX-512 code for x86-64; this machine is {platform.machine()}")
    cmd = native_mod.compile_command(compiler, native_mod.NATIVE_SOURCE_PATH, tmp_path / "engine.so",
                                     WARNING_FLAGS)
    if "avx512f" not in engine_mod._cpu_flags().split():
        # -march=native would leave out the AVX-512 intrinsics here; x86-64-v4 is the AVX-512 baseline,
        # so the warnings are still checked on a CPU that could not run the library.
        cmd = [("-march=x86-64-v4" if flag == "-march=native" else flag) for flag in cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=native_mod.COMPILE_TIMEOUT_S)
    assert done.returncode == 0 and not done.stderr.strip(), f"{' '.join(cmd)}:\n{done.stderr}"
