"""Blind arena turns: one reply from the live version and one from an earlier one, decoded together, sides
random, the versions hidden until the vote; arena votes rate versions and stay out of training."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from playground.chat import ChatError, ChatService, ChatSession, pair_summary
from playground.serving.decode_loop import DecodeLoop
from playground.serving.generation import SamplingSettings
from tests.test_decode_loop import finished, loop_with_version, prompt

SETTINGS = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=10)


@pytest.fixture
def live_v1(tiny_loaded, tmp_path):
    """A store where v1 (a random adapter) is live, served per row on the base engine."""
    store, policy, loop = loop_with_version(tiny_loaded, tmp_path, "v1", seed=11)
    loop.promote("v1")
    decode_loop = DecodeLoop(max_batch_rows=8)
    yield store, policy, decode_loop
    decode_loop.close()
    store.close()


def test_a_pair_on_two_versions_decodes_each_row_as_its_own_version_alone(tiny_loaded, live_v1):
    store, policy, decode_loop = live_v1
    live = policy.snapshot()
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    p = prompt(tokenizer, "pick a side")
    alone = {a: finished(decode_loop.stream(model, tokenizer, p, SETTINGS, (21, 22), adapter=a, lora=lora)).replies
             for a, lora in ((None, None), (live.adapter, live.lora))}
    mixed = finished(decode_loop.stream(model, tokenizer, p, SETTINGS, (21, 22),
                                        row_adapters=[(None, None), (live.adapter, live.lora)])).replies
    assert mixed[0].token_ids == alone[None][0].token_ids
    assert mixed[1].token_ids == alone[live.adapter][1].token_ids
    assert mixed[0].logprob_sum == pytest.approx(alone[None][0].logprob_sum, abs=1e-5)
    assert mixed[1].logprob_sum == pytest.approx(alone[live.adapter][1].logprob_sum, abs=1e-5)
    # The two versions really differ on this prompt, so the check above could fail.
    assert alone[None][1].token_ids != alone[live.adapter][1].token_ids or \
        alone[None][1].logprob_sum != pytest.approx(alone[live.adapter][1].logprob_sum, abs=1e-5)


def run_turns(service, n, text="hello there"):
    session = ChatSession()
    pairs = []
    for i in range(n):
        for _ in service.send(session, f"{text} {i}", SETTINGS):
            pass
        pairs.append(session.pair)
        service.vote(session, "a")
    return session, pairs


def test_arena_pairs_put_the_live_version_against_v0_in_random_slots_and_hide_them_until_the_vote(live_v1):
    store, policy, decode_loop = live_v1
    service = ChatService(policy, store, decode_loop=decode_loop, arena_rate=1.0, rng=random.Random(3))
    session = ChatSession()
    seen = Counter()
    for i in range(8):
        for _ in service.send(session, f"question {i}", SETTINGS):
            summary = pair_summary(session)
            # While it streams and until the vote, nothing names a version or says it is an arena pair.
            assert summary["arena"] is None
            assert all(r["policy_version"] is None for r in summary["replies"].values())
        assert session.pair.arena and sorted(session.pair.versions) == ["v0", "v1"]
        summary = pair_summary(session)
        assert summary["arena"] is None and summary["saved"]
        seen[session.pair.versions] += 1
        service.vote(session, "b")
        revealed = pair_summary(session)
        assert revealed["arena"] is True
        assert [revealed["replies"][s]["policy_version"] for s in "ab"] == list(session.pair.versions)
        stored = {r["slot"]: r["policy_version"] for r in store.replies_for_turn(session.pair.turn_id)}
        assert (stored["a"], stored["b"]) == session.pair.versions
    assert set(seen) == {("v0", "v1"), ("v1", "v0")}, "the live version always sat on the same side"
    assert store.arena_vote_counts(policy.model_id, "v1") == {"v0": 8}


def test_arena_votes_stay_out_of_training_unless_included(live_v1):
    store, policy, decode_loop = live_v1
    model_id = policy.model_id
    ordinary = ChatService(policy, store, decode_loop=decode_loop, arena_rate=0.0)
    _, pairs = run_turns(ordinary, 3, "ordinary")
    assert not any(p.arena for p in pairs)
    arena = ChatService(policy, store, decode_loop=decode_loop, arena_rate=1.0, rng=random.Random(0))
    _, pairs = run_turns(arena, 4, "arena")
    assert all(p.arena for p in pairs)
    # Identical replies make no pair; count what the rules keep of each kind.
    kept = {True: 0, False: 0}
    for turn in {r["turn_id"] for r in store.votes(model_id)}:
        replies = {r["slot"]: r for r in store.replies_for_turn(turn)}
        if replies["a"]["text"] != replies["b"]["text"]:
            kept[replies["a"]["policy_version"] != replies["b"]["policy_version"]] += 1
    new_all = store.count_new_pairs(model_id, include_arena=True) + len(
        store.training_pairs(model_id, held_out=True, new=None, include_arena=True))
    new_plain = store.count_new_pairs(model_id) + len(store.training_pairs(model_id, held_out=True, new=None))
    assert kept[True] > 0
    assert new_plain == kept[False]
    assert new_all == kept[False] + kept[True]
    rows = store.training_pairs(model_id, held_out=False, new=True, include_arena=True) + \
        store.training_pairs(model_id, held_out=True, new=None, include_arena=True)
    assert {r["policy_version"] for r in rows if r["arena"]} <= {"v0|v1", "v1|v0"}


def test_no_arena_without_an_earlier_version_or_without_the_decode_loop(tiny_loaded, tmp_path):
    from playground.serving.policy import PolicyHolder
    from store import Store

    store = Store(tmp_path / "a.db")
    store.ensure_base_version(tiny_loaded.model_id)
    decode_loop = DecodeLoop(max_batch_rows=4)
    service = ChatService(PolicyHolder(tiny_loaded, per_row_adapters=True), store, decode_loop=decode_loop,
                          arena_rate=1.0)
    _, pairs = run_turns(service, 2)
    assert not any(p.arena for p in pairs) and all(p.versions == ("v0", "v0") for p in pairs)
    with pytest.raises(ValueError):
        ChatService(PolicyHolder(tiny_loaded), store, arena_rate=1.5)
    decode_loop.close()
    store.close()


def test_a_vote_on_an_arena_pair_before_it_is_written_is_refused(live_v1):
    store, policy, decode_loop = live_v1
    service = ChatService(policy, store, decode_loop=decode_loop, arena_rate=1.0, rng=random.Random(1))
    session = ChatSession()
    stream = service.send(session, "early vote", SETTINGS)
    next(stream)
    with pytest.raises(ChatError, match="still being written"):
        service.vote(session, "a")
    for _ in stream:
        pass
    assert pair_summary(session)["arena"] is None



def test_through_the_api_an_unjudged_arena_pair_names_no_version(tiny_loaded, tmp_path):
    """The real app with v1 live and every turn an arena turn: /send and /state say nothing of the versions
    until /vote, which reveals them; /dashboard then counts the battle."""
    from gradio_client import Client

    from tests.servers import running_app

    store, _, _ = loop_with_version(tiny_loaded, tmp_path, "v1", seed=11)
    store.record_live(tiny_loaded.model_id, "v1", "promote")
    store.close()
    fast = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
    settings = {"adapters_dir": str(tmp_path / "adapters"), "model_cache": str(tmp_path / "c"), "enabled": False}
    with running_app(tiny_loaded, tmp_path / "v.db", loop_settings=settings,
                     extra_args=("--arena-rate", "1")) as (url, service, loop):
        assert loop.policy.snapshot().version == "v1"
        client = Client(url, verbose=False)
        for i in range(4):
            sent = client.predict(f"arena turn {i}", api_name="/send", **fast)
            state = client.predict(api_name="/state")
            for summary in (sent, state):
                assert summary["arena"] is None
                assert {r["policy_version"] for r in summary["replies"].values()} == {None}
            voted = client.predict("a", api_name="/vote")
            assert voted["arena"] is True
            versions = (voted["replies"]["a"]["policy_version"], voted["replies"]["b"]["policy_version"])
            assert sorted(versions) == ["v0", "v1"]
        data = client.predict(api_name="/dashboard")
        assert data["arena"]["n_battles"] == 4
        (v1_row,) = data["arena"]["win_vs_v0"]
        assert v1_row["version"] == "v1" and v1_row["n"] == 4
        # Every vote was for slot A: v1's wins are the turns where it sat on the left.
        assert v1_row["wins"] == sum(1 for v in service.store.votes(tiny_loaded.model_id) if v["a_version"] == "v1")
