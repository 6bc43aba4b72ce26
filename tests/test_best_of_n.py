"""Best-of-n in the chat: the kept reply is the reward model's argmax, candidates are per-row seeded (so
n = 1 is plain sampling), no usable reward model means plain pairs and a note, and the app's API and
badge say "best of N by rM"."""

from __future__ import annotations

import json

import pytest
from gradio_client import Client

from playground.best_of_n import MAX_BEST_OF_N, BestOfN, best_per_slot
from playground.chat import ChatService, ChatSession
from playground.serving.decode_loop import DecodeLoop
from playground.serving.generation import SamplingSettings, row_slots
from playground.serving.policy import PolicyHolder
from playground.web.ui import badge
from store import Store
from tests.servers import running_app
from tests.test_classic_path import REWARD, marked_store
from trainers.run import parse_args, run_round

SETTINGS = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=1.0)


def test_the_kept_row_of_each_slot_is_the_argmax_of_its_scores():
    slots = row_slots(6)
    assert slots == ["a", "b", "a", "b", "a", "b"]
    # a's rows 0, 2, 4 score 0.1, 0.9, 0.5: keep row 2; b's rows 1, 3, 5 score -1, -3, -0.5: keep row 5.
    assert best_per_slot(slots, [0.1, -1.0, 0.9, -3.0, 0.5, -0.5]) == [2, 5]
    assert best_per_slot(slots, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == [0, 1]  # a tie keeps the first
    assert best_per_slot(row_slots(2), [3.0, 4.0]) == [0, 1]  # n = 1: the pair itself
    with pytest.raises(ValueError):
        best_per_slot(["a", "a"], [1.0, 2.0])


def test_candidates_are_seeded_per_row_so_n_1_is_plain_sampling(tiny_loaded):
    loop = DecodeLoop(max_batch_rows=8)
    try:
        ids = tiny_loaded.tokenizer("hello there")["input_ids"]

        def rows(seeds):
            *_, last = loop.stream(tiny_loaded.model, tiny_loaded.tokenizer, ids, SETTINGS, seeds)
            return last.replies

        pair = rows((11, 12))
        four = rows((11, 12, 13, 14))
        assert [r.slot for r in four] == ["a", "b", "a", "b"]
        for plain, candidate in zip(pair, four[:2]):
            assert candidate.token_ids == plain.token_ids and candidate.seed == plain.seed
            assert candidate.logprob_sum == pytest.approx(plain.logprob_sum, abs=1e-5)
        # Past one batch a request would wait for ever: refused at once instead.
        from playground.serving.decode_loop import DecodeLoopBusy
        with pytest.raises(DecodeLoopBusy, match="do not fit"):
            rows(tuple(range(10)))
    finally:
        loop.close()


@pytest.fixture
def reward_model_db(tiny_loaded, tiny_model_dir, tmp_path):
    """A store with a usable reward model r1 (the marker word is learnable)."""
    marked_store(tmp_path / "chat.db", tiny_loaded.model_id, 120).close()
    _, summary = run_round(parse_args([
        "--algo", "reward", "--db", str(tmp_path / "chat.db"), "--reward-models-dir", str(tmp_path / "reward_models"),
        "--model", str(tiny_model_dir), "--config", json.dumps(REWARD), "--no-progress"]))
    assert summary["status"] == "succeeded" and summary["reward_model"] == "r1", summary
    return tmp_path / "chat.db"


def test_best_of_n_keeps_the_highest_scored_candidate_and_stores_it(tiny_loaded, reward_model_db):
    store = Store(reward_model_db)
    policy = PolicyHolder(tiny_loaded, per_row_adapters=True)
    loop = DecodeLoop(max_batch_rows=16)
    best = BestOfN(store, policy, n=3)
    service = ChatService(policy, store, decode_loop=loop, best_of_n=best)
    try:
        session = ChatSession()
        *_, pair = service.send(session, "tell me something", SETTINGS)
        assert pair.best_of == 3 and pair.reward_model == "r1" and len(pair.replies) == 2
        assert len(pair.candidate_scores) == 6
        for k, slot in enumerate("ab"):
            mine = pair.candidate_scores[k::2]  # rows a, b, a, b, ...: this slot's three candidates
            assert pair.reward_scores[k] == max(mine)
            assert pair.replies[k].slot == slot
        # The stored score is the reward model's score of the kept text, scored as it was trained.
        scorer = best.scorer()
        again = scorer.score_texts(tiny_loaded.tokenizer, session.context, [r.text for r in pair.replies])
        assert again == pytest.approx(list(pair.reward_scores), abs=1e-5)
        stored = store.replies_for_turn(pair.turn_id)
        assert [(r["best_of"], r["reward_model"]) for r in stored] == [(3, "r1"), (3, "r1")]
        assert [r["reward_score"] for r in stored] == pytest.approx(list(pair.reward_scores))
        assert "best of 3 by r1" in badge(pair, pair.replies[0])
        # Off again: one sample per slot, nothing ranked.
        best.configure(1)
        *_, plain = service.send(session, "and again", SETTINGS)
        assert plain.best_of == 1 and plain.reward_model is None and not plain.candidate_scores
        assert "best of" not in badge(plain, plain.replies[0])
    finally:
        loop.close()
        store.close()


def test_without_a_usable_reward_model_the_chat_says_so_and_serves_plain_pairs(tiny_loaded, tmp_path):
    store = Store(tmp_path / "none.db")
    policy = PolicyHolder(tiny_loaded, per_row_adapters=True)
    loop = DecodeLoop(max_batch_rows=16)
    best = BestOfN(store, policy, n=4)
    service = ChatService(policy, store, decode_loop=loop, best_of_n=best)
    try:
        session = ChatSession()
        *_, pair = service.send(session, "hello", SETTINGS)
        assert pair.best_of == 1 and pair.reply_ids  # a plain pair, stored
        assert any("no reward model whose held-out accuracy clears chance" in n for n in session.notes)
        with pytest.raises(ValueError, match="from 1"):
            best.configure(MAX_BEST_OF_N + 1)
        with pytest.raises(ValueError, match="no reward model r7"):
            best.configure(2, "r7")
    finally:
        loop.close()
        store.close()


def test_the_app_serves_best_of_n_from_its_flag(tiny_loaded, reward_model_db, tmp_path):
    extra = ("--best-of-n", "2", "--reward-models-dir", str(tmp_path / "reward_models"))
    with running_app(tiny_loaded, reward_model_db, extra_args=extra) as (url, _service):
        client = Client(url, verbose=False)
        reply = client.predict("hi", api_name="/send", max_new_tokens=8, temperature=1.0, top_p=1.0)
        for slot in "ab":
            assert reply["replies"][slot]["best_of"] == 2 and reply["replies"][slot]["reward_model"] == "r1"
            assert isinstance(reply["replies"][slot]["reward_score"], float)


def test_a_reward_model_that_fails_to_load_gives_plain_pairs_and_never_a_stuck_session(tiny_loaded, reward_model_db,
                                                                                      tmp_path):
    head = tmp_path / "reward_models" / "r1" / "score_head.safetensors"
    head.write_bytes(head.read_bytes()[:40])  # truncated after publishing
    store = Store(reward_model_db)
    policy = PolicyHolder(tiny_loaded, per_row_adapters=True)
    loop = DecodeLoop(max_batch_rows=16)
    service = ChatService(policy, store, decode_loop=loop, best_of_n=BestOfN(store, policy, n=2))
    try:
        session = ChatSession()
        for message in ("first", "second"):  # the second turn is not stuck behind the first's failure
            *_, pair = service.send(session, message, SETTINGS)
            assert pair.best_of == 1 and pair.reply_ids and not pair.generating
            assert any("r1 was refused" in n for n in session.notes), session.notes
        stored = store.turns_for_conversation(session.conversation_id)
        assert all(not (t["note"] or "").startswith("Best-of-n") for t in stored)  # not a truncation note
    finally:
        loop.close()
        store.close()
