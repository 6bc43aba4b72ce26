"""The one decode loop: requests decoded together give the tokens they get alone; rows join and leave;
the queue says how many are ahead; a full queue, a cancelled reader and a failing step are handled."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from playground.serving.decode_loop import DecodeFailed, DecodeLoop, DecodeLoopBusy, OwnerBusy
from playground.serving.generation import SamplingSettings, engine_for, sample_pair

SETTINGS = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=12)


def prompt(tokenizer, text):
    from playground.serving.prompting import render

    return render(tokenizer, [{"role": "user", "content": text}])


def decoding(stream):
    """Advance a stream until its request decodes (it may wait a moment first); returns that update."""
    for update in stream:
        if update.ahead is None and any(r.token_ids for r in update.replies):
            return update
    raise AssertionError("the stream ended before it decoded")


def finished(stream):
    last = None
    for update in stream:
        last = update
    return last


def hold_steps_until(loop, monkeypatch, engine, requests: int, timeout_s: float = 60) -> None:
    """Engine steps wait (up to timeout_s) until `requests` requests are in the loop: they then share the
    next step, however their threads were scheduled."""
    real = engine.decode_many
    all_in = threading.Event()
    deadline = time.monotonic() + timeout_s

    def held(*args, **kwargs):
        while not all_in.is_set():
            load = loop.load()
            if load["waiting"] + load["active_requests"] >= requests:
                all_in.set()
            elif not all_in.wait(0.05) and time.monotonic() > deadline:
                break
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_many", held)


@pytest.fixture
def gate(tiny_loaded, monkeypatch):
    """Engine steps wait while the gate is closed: a request that decodes then holds its rows for as long as
    a test needs, whatever the machine's speed. Opened at the end of the test."""
    engine = engine_for(tiny_loaded.model)
    real = engine.decode_many
    opened = threading.Event()

    def gated(*args, **kwargs):
        opened.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_many", gated)
    yield opened
    opened.set()


@pytest.fixture
def decode_loop():
    loop = DecodeLoop(max_batch_rows=16)
    yield loop
    loop.close()


def test_the_tiny_model_runs_on_the_engine(tiny_loaded):
    assert engine_for(tiny_loaded.model) is not None  # else every test here would take the HF path


def test_a_pair_decoded_with_six_other_requests_matches_it_alone(tiny_loaded, decode_loop, monkeypatch):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    texts = ["hello there", "the capital of France", "a", "list some fruit please", "code", "emoji 🙂", "why?"]
    seeds = [(11 + i, 101 + i) for i in range(len(texts))]
    alone = [finished(sample_pair(model, tokenizer, prompt(tokenizer, t), SETTINGS, s)) for t, s in zip(texts, seeds)]
    results: dict[int, list] = {}
    hold_steps_until(decode_loop, monkeypatch, engine_for(model), len(texts))
    barrier = threading.Barrier(len(texts))

    def run(i):
        barrier.wait()  # all seven submitted together, so they share steps
        results[i] = finished(decode_loop.sample_pair(model, tokenizer, prompt(tokenizer, texts[i]), SETTINGS,
                                                      seeds[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert decode_loop.max_rows_seen == 2 * len(texts), "the requests never shared one step"
    for i, replies in results.items():
        for got, want in zip(replies, alone[i]):
            assert got.token_ids == want.token_ids and got.text == want.text
            assert got.finish_reason == want.finish_reason
            assert got.logprob_sum == pytest.approx(want.logprob_sum, abs=1e-5)
    assert len(results) == len(texts)


def test_requests_past_the_rows_wait_and_see_their_place(tiny_loaded, gate):
    loop = DecodeLoop(max_batch_rows=2, max_waiting=8)  # one pair at a time
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    first = loop.stream(model, tokenizer, prompt(tokenizer, "first"), SETTINGS, (1, 2))
    decoding(first)  # decoding now: holds both rows
    waiting = [loop.stream(model, tokenizer, prompt(tokenizer, f"w{i}"), SETTINGS, (3 + i, 9 + i)) for i in range(2)]
    places = [next(w).ahead for w in waiting]
    assert places == [0, 1]
    assert loop.load()["waiting"] == 2 and loop.load()["active_rows"] == 2
    gate.set()
    finished(first)
    for w in waiting:
        last = finished(w)
        assert last.ahead is None and all(r.done for r in last.replies)
    loop.close()


def test_a_full_queue_refuses_at_once_and_starts_nothing(tiny_loaded, gate):
    loop = DecodeLoop(max_batch_rows=2, max_waiting=0)
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    first = loop.stream(model, tokenizer, prompt(tokenizer, "first"), SETTINGS, (1, 2))
    decoding(first)
    with pytest.raises(DecodeLoopBusy, match="try again"):
        next(loop.stream(model, tokenizer, prompt(tokenizer, "second"), SETTINGS, (3, 4)))
    assert loop.load()["waiting"] == 0
    gate.set()
    finished(first)
    loop.close()


def record_prefills(monkeypatch, engine) -> list[tuple[int, ...]]:
    """The prompts the engine prefills, in order: the order the loop admitted their requests."""
    order = []
    real = engine.prefill

    def recording(prompt_ids, *args, **kwargs):
        order.append(tuple(prompt_ids))
        return real(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "prefill", recording)
    return order


def latest(stream):
    """The place a waiting stream shows now (its next update: at once when it moved, else the heartbeat's)."""
    return next(stream).ahead


def test_one_owners_backlog_does_not_starve_another(tiny_loaded, gate, monkeypatch):
    loop = DecodeLoop(max_batch_rows=2, max_waiting=16)  # one pair at a time
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    order = record_prefills(monkeypatch, engine_for(model))
    prompts = {name: prompt(tokenizer, name) for name in ["x0", "x1", "x2", "x3", "x4", "x5", "x6", "y"]}
    running = loop.stream(model, tokenizer, prompts["x0"], SETTINGS, (1, 2), owner="x")
    decoding(running)
    backlog = [loop.stream(model, tokenizer, prompts[f"x{i}"], SETTINGS, (3 + i, 30 + i), owner="x")
               for i in range(1, 7)]
    assert [latest(b) for b in backlog] == [0, 1, 2, 3, 4, 5]
    other = loop.stream(model, tokenizer, prompts["y"], SETTINGS, (9, 10), owner="y")
    assert latest(other) == 0  # next, ahead of the six x queued before it
    assert [latest(b) for b in backlog] == [1, 2, 3, 4, 5, 6]  # each one place further back, and told so
    assert loop.load()["waiting"] == 7
    gate.set()
    for stream in [running, other, *backlog]:
        assert all(r.done for r in finished(stream).replies)
    names = {ids: name for name, ids in ((n, tuple(p)) for n, p in prompts.items())}
    assert [names[ids] for ids in order] == ["x0", "y", "x1", "x2", "x3", "x4", "x5", "x6"]
    loop.close()


def test_requests_of_one_owner_or_of_none_keep_their_order(tiny_loaded, gate, monkeypatch):
    loop = DecodeLoop(max_batch_rows=2, max_waiting=8)
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    order = record_prefills(monkeypatch, engine_for(model))
    running = loop.stream(model, tokenizer, prompt(tokenizer, "r"), SETTINGS, (1, 2))
    decoding(running)
    texts = ["n1", "x1", "n2", "x2"]
    waiting = [loop.stream(model, tokenizer, prompt(tokenizer, t), SETTINGS, (3 + i, 9 + i),
                           owner="x" if t.startswith("x") else None) for i, t in enumerate(texts)]
    for w in waiting:
        next(w)  # submitted, in this order
    places = [latest(w) for w in waiting]
    # x has nothing decoding and the unowned "r" is: x1 goes first, then the two take turns.
    assert places == [1, 0, 3, 2]
    place = dict(zip(texts, places))
    assert place["n1"] < place["n2"] and place["x1"] < place["x2"]
    gate.set()
    for stream in [running, *waiting]:
        finished(stream)
    by_prompt = {tuple(prompt(tokenizer, t)): t for t in texts}
    admitted = [by_prompt[ids] for ids in order[1:]]
    assert admitted.index("n1") < admitted.index("n2") and admitted.index("x1") < admitted.index("x2")
    assert admitted == sorted(texts, key=place.get)  # served in the order shown
    loop.close()


def test_an_owner_past_its_cap_is_refused_and_others_still_get_in(tiny_loaded, gate):
    loop = DecodeLoop(max_batch_rows=2, max_waiting=8, max_per_owner=2)
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    running = loop.stream(model, tokenizer, prompt(tokenizer, "x0"), SETTINGS, (1, 2), owner="x")
    decoding(running)
    queued = loop.stream(model, tokenizer, prompt(tokenizer, "x1"), SETTINGS, (3, 4), owner="x")
    assert latest(queued) == 0
    with pytest.raises(OwnerBusy, match=r"2 of your requests are already waiting or being written \(at most 2"):
        next(loop.stream(model, tokenizer, prompt(tokenizer, "x2"), SETTINGS, (5, 6), owner="x"))
    other = loop.stream(model, tokenizer, prompt(tokenizer, "y0"), SETTINGS, (7, 8), owner="y")
    assert latest(other) == 0 and loop.load()["waiting"] == 2
    gate.set()
    for stream in (running, queued, other):
        finished(stream)
    # Once x's requests are done, x may send again.
    assert all(r.done for r in finished(loop.stream(model, tokenizer, prompt(tokenizer, "x3"), SETTINGS, (9, 10),
                                                    owner="x")).replies)
    loop.close()


def test_the_chat_passes_the_person_as_owner_so_an_account_shares_one_cap(tiny_loaded, tmp_path, gate):
    from playground.chat import ChatError, ChatService, ChatSession
    from playground.serving.policy import PolicyHolder
    from store import Store

    store = Store(tmp_path / "owners.db")
    loop = DecodeLoop(max_batch_rows=2, max_waiting=8, max_per_owner=1)
    service = ChatService(PolicyHolder(tiny_loaded), store, decode_loop=loop)
    first_tab, second_tab, bob = ChatSession(user="alice"), ChatSession(user="alice"), ChatSession(user="bob")
    writing = service.send(first_tab, "from alice's first tab", SETTINGS)
    while next(writing).ahead is not None or not any(r.token_ids for r in first_tab.pair.replies):
        pass  # until it decodes (held at the gate): it holds both rows
    with pytest.raises(ChatError, match=r"Not sent: 1 of your requests are already waiting or being written"):
        list(service.send(second_tab, "from alice's second tab", SETTINGS))
    assert second_tab.pair is None and second_tab.user_message is None
    waiting = service.send(bob, "from bob", SETTINGS)
    assert next(waiting).ahead == 0  # bob is another owner: queued behind alice's one pair
    gate.set()
    *_, alice_pair = writing
    *_, bob_pair = waiting
    assert alice_pair.reply_ids and bob_pair.reply_ids
    loop.close()
    store.close()


def test_a_reader_that_goes_away_frees_its_rows(tiny_loaded):
    loop = DecodeLoop(max_batch_rows=2, max_waiting=4)
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    long = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=200)
    gone = loop.stream(model, tokenizer, prompt(tokenizer, "long one"), long, (1, 2))
    decoding(gone)
    gone.close()  # the tab was closed mid-stream
    after = finished(loop.stream(model, tokenizer, prompt(tokenizer, "next"), SETTINGS, (5, 6)))
    assert all(r.done for r in after.replies)
    assert loop.load()["active_rows"] == 0
    loop.close()


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny_loaded, decode_loop, monkeypatch):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    engine = engine_for(model)
    calls = {"n": 0}
    real = engine.decode_many

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a bad step")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_many", broken_once)
    with pytest.raises(DecodeFailed, match="a bad step"):
        finished(decode_loop.stream(model, tokenizer, prompt(tokenizer, "doomed"), SETTINGS, (1, 2)))
    after = finished(decode_loop.stream(model, tokenizer, prompt(tokenizer, "fine"), SETTINGS, (3, 4)))
    assert all(r.done for r in after.replies) and decode_loop.load()["active_rows"] == 0


def test_streamed_text_matches_the_decoded_tokens_at_every_step(tiny_loaded, decode_loop):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    long = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=60)
    for update in decode_loop.stream(model, tokenizer, prompt(tokenizer, "say a lot 🙂 שלום"), long, (7, 8)):
        for reply in update.replies:
            content = reply.token_ids[:-1] if reply.finish_reason == "stop" else reply.token_ids
            full = tokenizer.decode(content, skip_special_tokens=True)
            # Mid-stream the newest few tokens may still be an unfinished character; never anything else.
            assert full.startswith(reply.text.rstrip("\ufffd")) or reply.text.rstrip("\ufffd").startswith(full.rstrip("\ufffd"))
            if reply.done:
                assert reply.text == full


def test_four_sessions_through_the_app_stream_in_one_batch(tiny_loaded, tmp_path, monkeypatch):
    from gradio_client import Client

    from tests.servers import running_app

    engine = engine_for(tiny_loaded.model)
    with running_app(tiny_loaded, tmp_path / "four.db") as (url, service):
        loop = service.decode_loop

        hold_steps_until(loop, monkeypatch, engine, 4)
        clients = [Client(url, verbose=False) for _ in range(4)]
        results = [None] * 4

        def chat(i):
            results[i] = clients[i].predict(f"person {i} asks", api_name="/send", max_new_tokens=24,
                                            temperature=1.0, top_p=1.0)

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(r is not None and r["replies"]["a"]["text"] is not None for r in results)
        assert loop.max_rows_seen == 8  # four pairs in one step
        assert service.store.stats()["replies"] == 8


def test_through_the_app_a_waiting_person_sees_their_place_and_a_cancel_frees_rows(tiny_loaded, tmp_path, gate):
    from gradio_client import Client

    from tests.servers import running_app

    with running_app(tiny_loaded, tmp_path / "queue.db", extra_args=("--max-batch-rows", "2")) as (url, service):
        loop = service.decode_loop
        first, second, third = (Client(url, verbose=False) for _ in range(3))
        running = first.submit("the first person", api_name="/send", max_new_tokens=8)
        deadline = time.monotonic() + 60
        while loop.load()["active_rows"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.load()["active_rows"] == 2  # decoding, held at the gate: no rows left
        waiting = second.submit("the second person", api_name="/send", max_new_tokens=8)
        while not any((o or {}).get("ahead") == 0 for o in waiting.outputs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any((o or {}).get("ahead") == 0 for o in waiting.outputs()), waiting.outputs()
        # The third person gives up while waiting: their request leaves the queue.
        gone = third.submit("the third person", api_name="/send", max_new_tokens=8)
        while loop.load()["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        gone.cancel()
        third.close()
        while loop.load()["waiting"] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.load()["waiting"] == 1
        gate.set()
        assert running.result()["replies"]["a"]["finish_reason"] is not None
        assert waiting.result()["saved"] and waiting.result()["ahead"] is None
        assert service.store.stats()["turns"] == 2  # the cancelled request stored nothing


def loop_with_version(tiny_loaded, tmp_path, version, seed, poison=None):
    """A store with a published random adapter as `version`, and a training loop serving adapters per row."""
    import shutil

    import torch

    from playground.loop import LoopSettings, TrainingLoop
    from playground.serving.adapters import publish
    from playground.serving.policy import PolicyHolder
    from store import Store
    from tests.test_engine_lora import random_peft

    peft_model = random_peft(tiny_loaded.model, seed=seed)
    if poison is not None:  # 'nan': one NaN matrix; 'overflow': weights whose products overflow float32
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.fill_(float("nan") if poison == "nan" else 1e30)
                    if poison == "nan":
                        break
    peft_model.save_pretrained(tmp_path / f"raw-{version}")

    def write(tmp):
        for f in (tmp_path / f"raw-{version}").iterdir():
            shutil.copy(f, tmp / f.name)

    folder = publish(tmp_path / "adapters", version, write, {"base_model_id": tiny_loaded.model_id, "parent": "v0"})
    store = Store(tmp_path / "v.db")
    store.ensure_base_version(tiny_loaded.model_id)
    store.record_version(version, tiny_loaded.model_id, "v0", str(folder), {})
    policy = PolicyHolder(tiny_loaded, per_row_adapters=True)
    loop = TrainingLoop(LoopSettings(db=str(tmp_path / "v.db"), adapters_dir=str(tmp_path / "adapters"),
                                     model=tiny_loaded.model_id, model_cache=str(tmp_path / "c"), enabled=False),
                        store, policy)
    return store, policy, loop


@pytest.mark.parametrize("poison", ["nan", "overflow"])
def test_an_adapter_with_non_finite_weights_or_logits_is_refused_and_the_live_version_stays(tiny_loaded, tmp_path,
                                                                                            poison):
    from playground.serving.adapters import AdapterError

    store, policy, loop = loop_with_version(tiny_loaded, tmp_path, "v7", seed=4, poison=poison)
    with pytest.raises(AdapterError, match="non-finite"):
        loop.promote("v7")
    assert policy.snapshot().version == "v0"
    assert not any(name.startswith("v7:") for name in engine_for(tiny_loaded.model).adapters)
    store.close()


def test_versions_share_one_step_on_one_copy_of_the_weights(tiny_loaded, tmp_path, monkeypatch):
    """A promoted version is served as an adapter on the base model's engine: a v0 request and a v1 request
    decode in one step, each exactly as decoded alone, and the live version holds no copy of the weights."""
    store, policy, loop = loop_with_version(tiny_loaded, tmp_path, "v1", seed=3)
    loop.promote("v1")
    live = policy.snapshot()
    assert live.version == "v1" and live.model is tiny_loaded.model and live.adapter is not None

    decode_loop = DecodeLoop(max_batch_rows=4)
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    p = prompt(tokenizer, "which version am I")
    alone = {a: finished(decode_loop.stream(model, tokenizer, p, SETTINGS, (5, 6), adapter=a)).replies
             for a in (None, live.adapter)}
    assert alone[None][0].token_ids != alone[live.adapter][0].token_ids or \
        alone[None][0].logprob_sum != alone[live.adapter][0].logprob_sum  # the adapter changes the policy
    steps_before = decode_loop.steps
    hold_steps_until(decode_loop, monkeypatch, engine_for(model), 2)
    results = {}
    barrier = threading.Barrier(2)

    def run(a):
        barrier.wait()
        results[a] = finished(decode_loop.stream(model, tokenizer, p, SETTINGS, (5, 6), adapter=a)).replies

    threads = [threading.Thread(target=run, args=(a,)) for a in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert decode_loop.max_rows_seen == 4, "the two versions never shared a step"
    for a, replies in results.items():
        assert [r.token_ids for r in replies] == [r.token_ids for r in alone[a]]
        assert [r.logprob_sum for r in replies] == pytest.approx([r.logprob_sum for r in alone[a]], abs=1e-5)
    assert decode_loop.steps > steps_before
    decode_loop.close()
    store.close()


def test_the_next_turn_prefills_only_its_new_tokens_and_decodes_what_a_whole_prefill_would(tiny_loaded):
    """Prefix caching: turn 2's prompt (turn 1's prompt, the chosen reply, a new message) reuses the kept keys
    of the chosen row. Its replies are samples of the same distribution a whole prefill gives: every token's
    log-probability matches teacher-forced scoring of the reply under a fresh prefill."""
    from playground.serving.prompting import render

    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    engine = engine_for(model)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=24)
    loop = DecodeLoop(max_batch_rows=4)
    try:
        messages = [{"role": "user", "content": "tell me a long story about the sea"}]
        first = finished(loop.sample_pair(model, tokenizer, render(tokenizer, messages), settings, (5, 6)))
        assert len(loop.prefixes) == 2 and loop.prefixes.hits == 0
        chosen = first[1]
        turn2 = messages + [{"role": "assistant", "content": chosen.text}, {"role": "user", "content": "and then?"}]
        prompt2 = render(tokenizer, turn2)
        kept = prompt(tokenizer, "tell me a long story about the sea") + list(chosen.token_ids)
        shared = next((i for i, (a, b) in enumerate(zip(kept, prompt2)) if a != b), min(len(kept), len(prompt2)))
        assert shared > len(render(tokenizer, messages)), "the test needs a prompt that continues the reply"
        second = finished(loop.sample_pair(model, tokenizer, prompt2, settings, (7, 8)))
        assert loop.prefixes.hits == 1 and loop.prefixes.tokens_reused == shared
        for reply in second:
            tokens = list(reply.token_ids)
            logits = engine.score(prompt2 + tokens, start=len(prompt2) - 1)[: len(tokens)]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).sum().item()
            assert reply.logprob_sum == pytest.approx(expected, abs=1e-4)
        # The same prompt again (a regenerated pair) continues from turn 1's row again, never from its own
        # first try's rows: it takes the same path, so it decodes exactly as before.
        again = finished(loop.sample_pair(model, tokenizer, prompt2, settings, (7, 8)))
        assert loop.prefixes.hits == 2 and loop.prefixes.tokens_reused == 2 * shared
        assert [r.token_ids for r in again] == [r.token_ids for r in second]
    finally:
        loop.close()


def test_the_prefix_cache_keeps_to_its_budget_and_can_be_off(tiny_loaded):
    from playground.serving.prompting import render

    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    off = DecodeLoop(max_batch_rows=4, prefix_cache_mb=0)
    small = DecodeLoop(max_batch_rows=4, prefix_cache_mb=0.05)  # 52 KB: a row or two of the tiny model
    try:
        for i in range(4):
            p = render(tokenizer, [{"role": "user", "content": f"question number {i} about tides"}])
            finished(off.sample_pair(model, tokenizer, p, SETTINGS, (i, i + 50)))
            finished(small.sample_pair(model, tokenizer, p, SETTINGS, (i, i + 50)))
        assert len(off.prefixes) == 0 and off.prefixes.bytes == 0
        assert 0 < small.prefixes.bytes <= small.prefixes.max_bytes and len(small.prefixes) < 8
    finally:
        off.close()
        small.close()
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        DecodeLoop(prefix_cache_mb=-1)


def test_prefix_cache_evicts_least_recently_used_and_forgets_freed_engines():
    import gc
    import weakref

    from playground.serving.decode_loop import MIN_PREFIX_TOKENS, PrefixCache
    from playground.serving.engine import KVPrefix

    class Owner:  # stands in for an engine: only its identity and lifetime matter here
        pass

    def kept(owner, tokens):
        kv = torch.zeros(1, 1, len(tokens), 4)  # 16 bytes a token, keys and values: 32 a token
        return KVPrefix(tuple(tokens), kv, kv.clone(), None, owner_ref=weakref.ref(owner))

    engine, other = Owner(), Owner()
    n = MIN_PREFIX_TOKENS + 4
    a, b = list(range(n)), list(range(100, 100 + n))
    cache = PrefixCache(max_bytes=2 * 32 * n)  # room for two
    cache.add(kept(engine, a), prompt_len=2)
    cache.add(kept(engine, b), prompt_len=2)
    assert cache.find(engine, None, a + [1]) is not None  # a is used: b is now the oldest
    assert cache.find(other, None, a + [1]) is None  # another engine's keys never match
    assert cache.find(engine, "v1", a + [1]) is None  # nor another adapter's
    assert cache.find(engine, None, a[:2] + [7] * n) is None  # shares only the old prompt: not a continuation
    cache.add(kept(engine, list(range(200, 200 + n))), prompt_len=2)
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert cache.find(engine, None, b + [1]) is None and cache.find(engine, None, a + [1]) is not None
    cache.add(kept(other, list(range(300, 300 + n))), prompt_len=2)
    del other
    gc.collect()
    cache.find(engine, None, [0])  # a lookup drops the entries of engines that are gone
    assert len(cache) == 1 and all(prefix.owner is engine for prefix, _ in cache._entries.values())
