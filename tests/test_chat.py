"""ChatService on the tiny model and a real SQLite file: the rules of a turn, independent of Gradio."""

from __future__ import annotations

import json
import sqlite3

import pytest

from playground.chat import ChatError, ChatService, ChatSession
from playground.serving.generation import SamplingSettings
from playground.serving.policy import PolicyHolder
from store import Store

FAST = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=8)


@pytest.fixture
def service(tiny_loaded, tmp_path):
    store = Store(tmp_path / "chat.db", busy_timeout_ms=100)
    yield ChatService(PolicyHolder(tiny_loaded), store)
    store.close()


def send(service, session, text, settings=FAST):
    *_, pair = service.send(session, text, settings)
    return pair


def test_a_turn_is_stored_with_provenance(service):
    session = ChatSession(user="alice")
    pair = send(service, session, "hello")
    assert not pair.generating and len(pair.reply_ids) == 2
    rows = service.store.replies_for_turn(pair.turn_id)
    assert {r["seed"] for r in rows} == {r.seed for r in pair.replies}
    assert all(r["policy_version"] == "v0" and r["model_id"] == service.policy.model_id for r in rows)
    assert all(r["max_new_tokens"] == 8 and r["temperature"] == 1.0 for r in rows)
    assert [json.loads(r["token_ids_json"]) for r in rows] == [r.token_ids for r in pair.replies]
    assert service.store.conversation(session.conversation_id)["user"] == "alice"


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_message_generates_nothing(service, text):
    session = ChatSession()
    with pytest.raises(ChatError, match="empty"):
        send(service, session, text)
    assert session.pair is None and service.store.stats()["turns"] == 0


def test_judging_before_any_reply_is_refused(service):
    session = ChatSession()
    for action in (lambda: service.vote(session, "a"), lambda: service.rate(session, "a", "up"),
                   lambda: service.edit(session, "better"), lambda: list(service.regenerate(session, FAST))):
        with pytest.raises(ChatError, match="send a message first"):
            action()
    assert service.store.stats()["feedback"] == 0


def test_judging_while_the_pair_is_generating_is_refused(service):
    session = ChatSession()
    stream = service.send(session, "hello", SamplingSettings(max_new_tokens=8))
    next(stream)  # the first token of each reply is out; the pair is still being written
    with pytest.raises(ChatError, match="still being written"):
        service.vote(session, "a")
    with pytest.raises(ChatError, match="still being written"):
        send(service, session, "a second message at once")
    for _ in stream:
        pass
    service.vote(session, "a")
    assert service.store.stats()["current_feedback"] == {"choice": {"a": 1}}


def test_unknown_values_are_refused(service):
    session = ChatSession()
    send(service, session, "hi")
    with pytest.raises(ChatError, match="Unknown choice"):
        service.vote(session, "c")
    with pytest.raises(ChatError, match="Unknown reply"):
        service.rate(session, "c", "up")
    with pytest.raises(ChatError, match="Unknown rating"):
        service.rate(session, "a", "sideways")
    assert service.store.stats()["feedback"] == 0


def test_the_chosen_reply_becomes_the_next_turns_context(service):
    session = ChatSession()
    first = send(service, session, "first question")
    service.vote(session, "b")
    chosen = first.reply("b").text
    assert session.messages()[-1] == {"role": "assistant", "content": chosen}
    send(service, session, "second question")
    context = json.loads(service.store.turns_for_conversation(session.conversation_id)[1]["context_json"])
    assert context[-3:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": chosen},
        {"role": "user", "content": "second question"},
    ]


@pytest.mark.parametrize("choice, edit, expected", [("tie", "my own reply", "edit"), ("both_bad", None, "a"),
                                                    (None, None, "a"), ("a", "ignored edit", "a")])
def test_continuation_after_tie_both_bad_or_no_vote(service, choice, edit, expected):
    session = ChatSession()
    pair = send(service, session, "q")
    if edit:
        service.edit(session, edit)
    if choice:
        service.vote(session, choice)
    want = edit if expected == "edit" else pair.reply(expected).text
    assert session.messages()[-1]["content"] == want


def test_regenerate_keeps_the_old_pair_marked_superseded(service):
    session = ChatSession()
    old = send(service, session, "q")
    *_, new = service.regenerate(session, FAST)
    assert (new.turn_id, new.index) == (old.turn_id, 1)
    rows = service.store.replies_for_turn(old.turn_id)
    assert [(r["pair"], r["superseded"]) for r in rows] == [(0, 1), (0, 1), (1, 0), (1, 0)]
    service.vote(session, "a")
    assert service.store.feedback_for_turn(old.turn_id)[0]["pair"] == 1


def test_locked_database_vote_is_reported_then_succeeds(service, tmp_path):
    session = ChatSession()
    send(service, session, "q")
    other = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
    other.execute("begin exclusive")
    with pytest.raises(ChatError, match="NOT saved.*locked"):
        service.vote(session, "a")
    other.execute("rollback")
    other.close()
    assert session.pair.choice is None and service.store.stats()["feedback"] == 0
    service.vote(session, "a")
    assert service.store.stats()["feedback"] == 1


def test_pair_generated_while_the_database_is_locked_is_saved_with_the_vote(service, tmp_path):
    session = ChatSession()
    other = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
    other.execute("begin exclusive")
    pair = send(service, session, "q")
    assert not pair.reply_ids and any("not saved yet" in n for n in session.notes)
    with pytest.raises(ChatError, match="not saved yet"):
        service.vote(session, "a")
    other.execute("rollback")
    other.close()
    service.vote(session, "b")  # saves the pair first, then the vote
    assert service.store.stats()["replies"] == 2 and service.store.stats()["feedback"] == 1
    assert not any("not saved yet" in n for n in session.notes)


def test_new_conversation_starts_clean(service):
    session = ChatSession()
    send(service, session, "q")
    first_conversation = session.conversation_id
    service.new_conversation(session)
    assert session.messages() == [] and session.pair is None
    send(service, session, "again")
    assert session.conversation_id != first_conversation


def test_sessions_are_fresh_copies():
    import copy

    template = ChatSession()
    one, two = copy.deepcopy(template), copy.deepcopy(template)
    assert len({template.session_id, one.session_id, two.session_id}) == 3
