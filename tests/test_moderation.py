"""The moderation hook: its protocol and failure policy, the word-list example, loading it at start, and what
a refused message and a withheld reply do to a turn, in the store, the chat and through a real server."""

from __future__ import annotations

import json
import logging
import os

import pytest

from playground.chat import ChatError, ChatService, ChatSession, MessageRefused, pair_summary
from playground.moderation import (DEFAULT_WORDS_FILE, HOOK_FAILED_REASON, MAX_REASON_CHARS, WORDS_FILE_ENV,
                                   ModerationHookError, Moderator, allow_all, load_hook, word_list)
from playground.serving.generation import SamplingSettings
from playground.serving.policy import PolicyHolder
from store import FeedbackError, Store

FAST = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=6)


# -- the protocol ------------------------------------------------------------------------------------

def test_none_allows_a_string_refuses_and_the_reason_is_tidied():
    assert Moderator(lambda text, role: None).check("hi", "user") == (None, False)
    assert Moderator(lambda text, role: "  too\n rude ").check("hi", "assistant") == ("too rude", False)
    reason, failed = Moderator(lambda text, role: "x" * 1000).check("hi", "user")
    assert len(reason) == MAX_REASON_CHARS and reason.endswith("\u2026") and not failed
    with pytest.raises(ValueError, match="unknown role"):
        Moderator(allow_all).check("hi", "system")
    assert not Moderator(allow_all).active and Moderator(lambda t, r: None).active


@pytest.mark.parametrize("hook", [lambda t, r: 1 / 0, lambda t, r: True, lambda t, r: "   ", lambda t, r: 0])
def test_a_hook_that_raises_or_answers_outside_the_protocol_fails_closed_and_is_logged(hook, caplog):
    with caplog.at_level(logging.ERROR, logger="playground.moderation"):
        assert Moderator(hook, "tests:hook").check("anything", "user") == (HOOK_FAILED_REASON, True)
    assert any("tests:hook" in r.getMessage() and "refusing it" in r.getMessage() for r in caplog.records)


# -- the word-list example ---------------------------------------------------------------------------

def test_the_word_list_matches_whole_words_and_phrases_case_blind(tmp_path, monkeypatch):
    words = tmp_path / "words.txt"
    words.write_text("# our list\nsecret plan\nbanana  # a trailing comment\n", encoding="utf-8")
    monkeypatch.setenv(WORDS_FILE_ENV, str(words))
    assert word_list("the Secret   Plan is ready", "user") == \
        "it contains \u201csecret plan\u201d, which is on the word list"
    assert word_list("BANANA!", "assistant") is not None
    assert word_list("bananas and secretplan", "user") is None  # whole words only
    assert word_list("our list", "user") is None  # comments are not words


def test_the_word_list_is_read_again_when_the_file_changes(tmp_path, monkeypatch):
    words = tmp_path / "words.txt"
    words.write_text("banana\n", encoding="utf-8")
    monkeypatch.setenv(WORDS_FILE_ENV, str(words))
    assert word_list("a banana", "user") is not None
    words.write_text("kiwi\n", encoding="utf-8")
    stamp = words.stat().st_mtime_ns + 1_000_000_000
    os.utime(words, ns=(stamp, stamp))  # a new modification time, whatever the file system's resolution
    assert word_list("a banana", "user") is None and word_list("a kiwi", "user") is not None


def test_the_shipped_list_and_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv(WORDS_FILE_ENV, raising=False)
    assert DEFAULT_WORDS_FILE.exists()
    assert "my password is" in word_list("My password is hunter2", "user")
    assert word_list("hello there", "user") is None
    monkeypatch.setenv(WORDS_FILE_ENV, str(tmp_path / "nowhere.txt"))
    with pytest.raises(ModerationHookError, match="nowhere.txt cannot be read"):
        word_list("hello", "user")
    with pytest.raises(ModerationHookError, match="failed on a test message.*nowhere.txt cannot be read"):
        load_hook("playground.moderation:word_list")  # the app does not start on a list it cannot read


# -- loading the hook at start -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "is not module:function"),
    ("tests.no_such_module:check", "cannot import tests.no_such_module"),
    ("tests.moderation_hooks:missing", "tests.moderation_hooks has no missing"),
    ("tests.moderation_hooks:NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function"),
    ("tests.moderation_hooks:broken", r"failed on a test message \(RuntimeError: the policy service is down\)"),
    ("tests.moderation_hooks:unsure", "returned True for a test message"),
])
def test_a_hook_that_cannot_be_used_is_a_clear_error(spec, message):
    with pytest.raises(ModerationHookError, match=message):
        load_hook(spec)


def test_the_app_does_not_start_with_a_broken_hook_and_says_why(tmp_path, capsys):
    import app

    db = tmp_path / "never.db"
    assert app.main(["--moderation", "tests.no_such_module:check", "--db", str(db), "--no-eval"]) == 1
    err = capsys.readouterr().err
    assert "error: --moderation tests.no_such_module:check: cannot import tests.no_such_module" in err
    assert not db.exists()  # stopped before anything was opened (the model is not even loaded)


def test_the_shipped_hooks_load():
    assert not load_hook("playground.moderation:allow_all").active
    assert load_hook("playground.moderation:word_list").hook is word_list


# -- in the chat -------------------------------------------------------------------------------------

@pytest.fixture
def make_service(tiny_loaded, tmp_path):
    stores = []

    def make(hook) -> ChatService:
        store = Store(tmp_path / f"moderated-{len(stores)}.db")
        stores.append(store)
        return ChatService(PolicyHolder(tiny_loaded), store, moderation=Moderator(hook, "tests:hook"))

    yield make
    for store in stores:
        store.close()


def send(service, session, text):
    *_, pair = service.send(session, text, FAST)
    return pair


def refuse_the_first_reply():
    """A hook allowing every message and every reply but the first it is asked about (reply A of the first pair)."""
    seen = []

    def hook(text, role):
        if role == "assistant":
            seen.append(text)
            return "the first reply is refused" if len(seen) == 1 else None
        return None

    return hook


def test_a_refused_message_is_recorded_on_its_turn_and_nothing_is_generated(make_service):
    from tests.moderation_hooks import strict

    service = make_service(strict)
    session = ChatSession(user="alice")
    with pytest.raises(MessageRefused, match="Your message was not sent: the moderation check refused it: it "
                                             "mentions the forbidden topic. Nothing was generated"):
        send(service, session, "Tell me the FORBIDDEN thing")
    assert session.pair is None and session.user_message is None and session.messages() == []
    (turn,) = service.store.refused_turns(session.conversation_id)
    assert turn["user_message"] == "Tell me the FORBIDDEN thing" and turn["idx"] == 0
    (record,) = turn["moderation"]
    assert record["role"] == "user" and record["reason"] == "it mentions the forbidden topic"
    assert record["hook"] == "tests:hook" and record["failed"] is False and record["at"]
    assert service.store.stats()["replies"] == 0
    assert service.store.conversation(session.conversation_id)["user"] == "alice"


def test_a_withheld_reply_is_stored_never_shown_and_its_pair_cannot_be_judged(make_service):
    from playground.web.ui import badge, conversation, notice

    service = make_service(refuse_the_first_reply())
    session = ChatSession()
    pair = send(service, session, "hello")
    assert pair.withheld == {"a": "the first reply is refused"} and not pair.held
    summary = pair_summary(session)
    assert summary["replies"]["a"]["text"] is None and summary["replies"]["b"]["text"] == pair.reply("b").text
    assert summary["withheld"] == {"a": "the first reply is refused"}
    for action in (lambda: service.vote(session, "a"), lambda: service.rate(session, "b", "up"),
                   lambda: service.edit(session, "my own reply")):
        with pytest.raises(ChatError, match="cannot be judged: reply A was withheld by the moderation check"):
            action()
    with pytest.raises(FeedbackError, match="withheld"):  # the store refuses it too, whoever asks
        service.store.record_choice(pair.turn_id, pair.index, "b", "someone", "another-session")
    stored = service.store.replies_for_turn(pair.turn_id)
    assert [r["text"] for r in stored] == [pair.reply("a").text, pair.reply("b").text]  # kept for the audit
    (record,) = service.store.moderation_for_turn(pair.turn_id)
    assert (record["role"], record["pair"], record["slot"]) == ("assistant", 0, "a")
    stats = service.store.stats()
    assert stats["feedback"] == 0 and stats["training_pairs"] == 0
    # What the page shows: why, not the text; the conversation goes on from B.
    shown = notice(session)
    assert "Reply A was withheld by the moderation check: the first reply is refused" in shown
    assert "cannot be judged" in shown and "Which reply is better" not in shown
    assert "withheld" in badge(pair, pair.reply("a"))
    assert conversation(session)[-1]["role"] == "assistant"
    assert session.messages()[-1] == {"role": "assistant", "content": pair.reply("b").text}
    *_, again = service.regenerate(session, FAST)  # a new pair, allowed this time: judgeable
    assert not again.withheld
    # The tiny model's 6-token replies are now and then empty or the same twice, and such a pair makes no
    # training pair (store/pairs.py): regenerate until it can, so the vote below must make one.
    for _ in range(8):
        if again.reply("b").text.strip() and again.reply("a").text != again.reply("b").text:
            break
        *_, again = service.regenerate(session, FAST)
    service.vote(session, "b")
    assert service.store.stats()["training_pairs"] == 1
    assert [r["pair"] for r in service.store.moderation_for_turn(pair.turn_id)] == [0]


def test_a_refused_better_reply_is_not_saved_and_the_pair_can_still_be_judged(make_service):
    from tests.moderation_hooks import strict

    def strict_but_replies_allowed(text, role):
        return strict(text, role) if role == "user" else None

    service = make_service(strict_but_replies_allowed)
    session = ChatSession()
    pair = send(service, session, "hello")
    with pytest.raises(MessageRefused, match="Your better reply was not saved: the moderation check refused it: "
                                             "it mentions the forbidden topic"):
        service.edit(session, "a forbidden better reply")
    assert pair.edit is None and service.store.stats()["feedback"] == 0
    (record,) = service.store.moderation_for_turn(pair.turn_id)
    assert (record["role"], record["pair"], record["edit"]) == ("user", 0, True)
    service.vote(session, "a")  # a refused better reply does not withhold the pair
    service.edit(session, "a fine better reply")
    assert service.store.stats()["current_feedback"] == {"choice": {"a": 1}, "edit": {"text": 1}}


def test_with_both_replies_withheld_the_turn_leaves_the_conversation(make_service):
    from tests.moderation_hooks import strict

    service = make_service(strict)
    session = ChatSession()
    first = send(service, session, "hello")
    assert set(first.withheld) == {"a", "b"}
    assert session.messages() == [{"role": "user", "content": "hello"}]  # shown, with nothing after it
    with pytest.raises(MessageRefused):
        send(service, session, "something forbidden")
    second = send(service, session, "next question")
    turns = service.store.turns_for_conversation(session.conversation_id)
    assert [(t["idx"], t["user_message"]) for t in turns] == [(0, "hello"), (1, "something forbidden"),
                                                             (2, "next question")]
    context = json.loads(turns[2]["context_json"])
    assert all("hello" not in m["content"] for m in context)  # the model never reads the withheld turn
    assert second.turn_id == turns[2]["id"]


def test_a_hook_that_fails_refuses_the_message_and_withholds_replies(make_service, caplog):
    def down(text, role):
        raise ConnectionError("the classifier is unreachable")

    service = make_service(down)
    session = ChatSession()
    with caplog.at_level(logging.ERROR, logger="playground.moderation"):
        with pytest.raises(MessageRefused, match="Your message was not sent: the moderation check failed"):
            send(service, session, "hello")
    assert any(r.exc_info for r in caplog.records)  # the traceback is in the log
    (turn,) = service.store.refused_turns()
    assert turn["moderation"][0]["failed"] is True

    def down_for_replies(text, role):
        if role == "assistant":
            raise ConnectionError("the classifier is unreachable")

    service = make_service(down_for_replies)
    pair = send(service, ChatSession(), "hello")
    assert pair.withheld == {"a": HOOK_FAILED_REASON, "b": HOOK_FAILED_REASON}
    assert all(r["failed"] for r in service.store.moderation_for_turn(pair.turn_id))


def test_with_a_hook_the_replies_are_not_shown_until_checked(make_service):
    service = make_service(lambda text, role: None)
    session = ChatSession()
    seen = [(p.generating, p.held, [r.text for r in p.replies], pair_summary(session)["replies"])
            for p in service.send(session, "hello", SamplingSettings(max_new_tokens=12))]
    writing = [s for s in seen if s[0]]
    assert writing and all(held and texts == ["", ""] for _, held, texts, _ in writing)
    assert all(r["text"] == "" for *_, replies in writing for r in replies.values())
    generating, held, texts, _ = seen[-1]
    assert not generating and not held and texts == [r.text for r in session.pair.replies]
    assert [r["text"] for r in service.store.replies_for_turn(session.pair.turn_id)] == texts


def test_the_word_list_in_the_chat(make_service, monkeypatch):
    monkeypatch.delenv(WORDS_FILE_ENV, raising=False)
    service = make_service(load_hook("playground.moderation:word_list").hook)
    with pytest.raises(MessageRefused, match="“my password is”, which is on the word list"):
        send(service, ChatSession(), "hi, my password is hunter2")


# -- through a real server --------------------------------------------------------------------------

def test_through_the_server_a_refusal_is_said_and_recorded_and_a_withheld_pair_takes_no_vote(tiny_loaded,
                                                                                           tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from tests.servers import running_app

    args = ("--moderation", "tests.moderation_hooks:strict")
    with running_app(tiny_loaded, tmp_path / "moderated.db", extra_args=args) as (url, service):
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="the moderation check refused it: it mentions the forbidden topic"):
            client.predict("something forbidden", api_name="/send", max_new_tokens=4)
        (turn,) = service.store.refused_turns()
        assert turn["user_message"] == "something forbidden"
        assert turn["moderation"][0]["hook"] == "tests.moderation_hooks:strict"
        pair = client.predict("hello", api_name="/send", max_new_tokens=4)
        assert pair["saved"] and pair["withheld"] == {"a": "replies are withheld on this test server",
                                                      "b": "replies are withheld on this test server"}
        assert pair["replies"]["a"]["text"] is None and pair["replies"]["b"]["text"] is None
        with pytest.raises(AppError, match="This pair cannot be judged"):
            client.predict("a", api_name="/vote")
        again = client.predict(api_name="/regenerate", max_new_tokens=4)
        assert again["pair"] == 1 and set(again["withheld"]) == {"a", "b"}
        stats = service.store.stats()
        assert (stats["turns"], stats["replies"], stats["feedback"], stats["training_pairs"]) == (2, 4, 0, 0)
        records = service.store.moderation_for_turn(pair["turn_id"])
        assert [(r["pair"], r["slot"]) for r in records] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
