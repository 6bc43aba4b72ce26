"""The real app over HTTP, driven by gradio_client the way a user's script would drive it."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from gradio_client import Client

from tests.servers import running_app

NASTY = "nul\x00 bell\x07 emoji 🙂 rtl שלום مرحبا <script>alert(1)</script> <img src=x onerror=alert(2)>"
PASTE = "\n".join(f"line {i}" for i in range(10_000))
FAST = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def app(tiny_loaded, tmp_path_factory):
    db = tmp_path_factory.mktemp("api") / "api.db"
    with running_app(tiny_loaded, db) as (url, service):
        yield url, service, db


def client(url):
    return Client(url, verbose=False)


def test_two_concurrent_sessions_full_flow_then_every_row(app):
    url, service, _ = app
    store = service.store
    tables = ("conversations", "turns", "feedback")
    before = {t: store.stats()[t] for t in tables}
    results = {}

    def session(name, message, choice):
        c = client(url)
        c.predict(api_name="/new_conversation")
        first = c.predict(message, api_name="/send", **FAST)
        voted = c.predict(choice, api_name="/vote")
        rated = c.predict("b", "down", api_name="/rate")
        edited = c.predict(f"{name}'s better reply", api_name="/edit")
        regenerated = c.predict(api_name="/regenerate", **FAST)
        revoted = c.predict("a", api_name="/vote")
        revoted = c.predict("tie", api_name="/vote")  # replaces the vote just given
        second = c.predict(f"{name} follows up", api_name="/send", **FAST)
        results[name] = dict(first=first, voted=voted, rated=rated, edited=edited, regenerated=regenerated,
                             revoted=revoted, second=second)

    threads = [threading.Thread(target=session, args=("ann", "hello from ann", "a")),
               threading.Thread(target=session, args=("bob", "hello from bob", "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {"ann", "bob"}

    ann, bob = results["ann"], results["bob"]
    assert ann["first"]["conversation_id"] != bob["first"]["conversation_id"]
    for name, r in results.items():
        first, regen = r["first"], r["regenerated"]
        assert r["voted"]["choice"] in ("a", "b") and r["rated"]["ratings"] == {"b": "down"}
        assert r["edited"]["edit"] == f"{name}'s better reply"
        assert regen["turn_id"] == first["turn_id"] and regen["pair"] == 1 and regen["choice"] is None
        assert r["second"]["turn_id"] != first["turn_id"]

        turn_id = first["turn_id"]
        replies = store.replies_for_turn(turn_id)
        assert [(x["pair"], x["slot"], x["superseded"]) for x in replies] == [
            (0, "a", 1), (0, "b", 1), (1, "a", 0), (1, "b", 0)]
        for x in replies:
            assert x["policy_version"] == "v0" and x["model_id"] == service.policy.model_id
            assert x["finish_reason"] in ("stop", "length") and x["n_tokens"] >= 1 and x["logprob_sum"] < 0
            assert x["max_new_tokens"] == 12 and x["seed"] is not None and x["latency_s"] > 0
        assert [x["text"] for x in replies[:2]] == [first["replies"]["a"]["text"], first["replies"]["b"]["text"]]

        feedback = store.feedback_for_turn(turn_id)
        assert [(f["kind"], f["pair"], f["value"], f["replaced_by"] is None) for f in feedback] == [
            ("choice", 0, r["voted"]["choice"], True),
            ("rating", 0, "down", True),
            ("edit", 0, f"{name}'s better reply", True),
            ("choice", 1, "a", False),
            ("choice", 1, "tie", True),
        ]
        assert feedback[1]["reply_id"] == replies[1]["id"]
        assert len({f["session_id"] for f in feedback}) == 1

        # After a tie with an edit on the *old* pair, the new pair has no edit: the conversation goes on from A.
        turns = store.turns_for_conversation(first["conversation_id"])
        assert [t["idx"] for t in turns] == [0, 1]
        context = json.loads(turns[1]["context_json"])
        assert context[-3:] == [
            {"role": "user", "content": f"hello from {name}"},
            {"role": "assistant", "content": regen["replies"]["a"]["text"]},
            {"role": "user", "content": f"{name} follows up"},
        ]
    after = {t: store.stats()[t] for t in tables}
    assert after["conversations"] - before["conversations"] == 2
    assert after["turns"] - before["turns"] == 4
    assert after["feedback"] - before["feedback"] == 10


def test_bad_input_gets_a_clear_error_and_writes_nothing(app):
    url, service, _ = app
    c = client(url)
    c.predict(api_name="/new_conversation")
    count = lambda: service.store.stats()["feedback"]  # noqa: E731
    before = count()
    for call, message in [
        (lambda: c.predict("a", api_name="/vote"), "send a message first"),
        (lambda: c.predict("   ", api_name="/send"), "empty"),
    ]:
        with pytest.raises(Exception, match=message):
            call()
    c.predict("hi", api_name="/send", **FAST)
    for call, message in [
        (lambda: c.predict("best", api_name="/vote"), "Unknown choice"),
        (lambda: c.predict("c", "up", api_name="/rate"), "Unknown reply"),
        (lambda: c.predict("a", "meh", api_name="/rate"), "Unknown rating"),
        (lambda: c.predict("", api_name="/edit"), "empty"),
        (lambda: c.predict("x", api_name="/send", temperature=9.0), "temperature"),
        (lambda: c.predict("x" * 200_001, api_name="/send"), "limit"),
    ]:
        with pytest.raises(Exception, match=message):
            call()
    assert count() == before


def test_awkward_text_is_stored_exactly(app):
    url, service, _ = app
    c = client(url)
    notes = {}
    for text in (NASTY, PASTE, "[click](javascript:alert(3))"):
        c.predict(api_name="/new_conversation")
        out = c.predict(text, api_name="/send", **FAST)
        stored = next(t for t in service.store.turns_for_conversation(out["conversation_id"])
                      if t["id"] == out["turn_id"])
        assert stored["user_message"] == text
        assert c.predict("a", api_name="/vote")["choice"] == "a"
        notes[text] = (stored["note"], out["notes"])
    # The 10,000-line paste is stored whole; the model read its first 8,000 characters and the person is told.
    assert "first 8,000" in notes[PASTE][0] and any("first 8,000" in n for n in notes[PASTE][1])
    assert notes[NASTY] == (None, [])


def test_locked_database_vote_is_not_saved_then_saved(app):
    url, service, db = app
    c = client(url)
    c.predict(api_name="/new_conversation")
    out = c.predict("lock test", api_name="/send", **FAST)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("begin exclusive")
    try:
        with pytest.raises(Exception, match="NOT saved"):
            c.predict("a", api_name="/vote")
    finally:
        other.execute("rollback")
        other.close()
    assert service.store.feedback_for_turn(out["turn_id"]) == []
    assert c.predict("a", api_name="/vote")["choice"] == "a"
    assert [f["value"] for f in service.store.feedback_for_turn(out["turn_id"])] == ["a"]


def test_a_simulated_user_is_marked_in_the_store(app):
    url, service, _ = app
    c = client(url)
    out = c.predict("sim-concise-1", True, api_name="/new_conversation")
    assert out["user"] == "sim-concise-1" and out["simulated"] is True
    out = c.predict("hello", api_name="/send", **FAST)
    c.predict("a", api_name="/vote")
    conversation = service.store.conversation(out["conversation_id"])
    assert (conversation["user"], conversation["simulated"]) == ("sim-concise-1", 1)
    assert [f["user"] for f in service.store.feedback_for_turn(out["turn_id"])] == ["sim-concise-1"]
    with pytest.raises(Exception, match="user name"):
        c.predict("x" * 500, api_name="/new_conversation")
    plain = c.predict(api_name="/new_conversation")
    assert plain["simulated"] is False


def test_the_conversation_and_both_reply_panels_render_markdown_alike(app):
    url, _, _ = app
    components = {c["props"].get("elem_id"): c["props"] for c in client(url).config["components"]}
    keys = ("render_markdown", "sanitize_html", "line_breaks", "allow_tags", "latex_delimiters")
    rendering = [{k: components[panel][k] for k in keys} for panel in ("history", "reply-a", "reply-b")]
    assert rendering[0] == rendering[1] == rendering[2]
    assert rendering[0]["render_markdown"] is True and rendering[0]["sanitize_html"] is True


def test_the_conversation_leaves_off_the_reply_until_a_judgment_picks_it():
    """Showing reply A as the answer before the vote would repeat it and bias the judge to the left reply."""
    from playground.chat import ChatSession, Pair
    from playground.serving.generation import SampledReply, SamplingSettings
    from playground.web.ui import conversation

    replies = [SampledReply("a", 1, text="reply **A**", finish_reason="stop"),
               SampledReply("b", 2, text="reply <b>B</b>", finish_reason="stop")]
    session = ChatSession(history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                          user_message="x < y?", pair=Pair(replies=replies, version="v0", settings=SamplingSettings(),
                                                           generating=False))
    shown = lambda: [(m["role"], m["content"]) for m in conversation(session)]  # noqa: E731
    earlier = [("user", "hi"), ("assistant", "hello"), ("user", "x &lt; y?")]
    assert shown() == earlier
    session.pair.edit = "my **own** reply"
    assert shown() == earlier + [("assistant", "my **own** reply")]
    session.pair.choice = "b"
    assert shown() == earlier + [("assistant", "reply &lt;b>B&lt;/b>")]
    session.pair.choice, session.pair.edit = "tie", None  # the session goes on from A, and says so now
    assert shown() == earlier + [("assistant", "reply **A**")]


def test_html_in_text_is_escaped_outside_code_only():
    from playground.web.ui import markdown_source

    assert markdown_source("<img src=x onerror=alert(1)> & **b**") == "&lt;img src=x onerror=alert(1)> &amp; **b**"
    assert markdown_source("`<b>` and ``a`<b>`` stay") == "`<b>` and ``a`<b>`` stay"
    fenced = "<p>\n```html\n<p>a & b</p>\n```\n<p>"
    assert markdown_source(fenced) == "&lt;p>\n```html\n<p>a & b</p>\n```\n&lt;p>"
    assert markdown_source("```\nnever closed <b>") == "```\nnever closed <b>"
    assert markdown_source(r"\<b> is literal, \\<b> is not") == r"\<b> is literal, \\&lt;b> is not"


def test_every_training_setting_says_what_it_trades(app):
    """The admin panel's settings each carry a one-line explanation of what they trade (issue 14)."""
    url, _, _ = app
    by_label = {c["props"].get("label"): c["props"] for c in client(url).config["components"]}
    settings = ("beta (next round)", "learning rate", "epochs", "loss", "reference policy", "algorithm (next rounds)",
                "PPO KL coefficient", "PPO learning rate", "PPO iterations", "best-of-n in the chat (1: off)")
    for label in settings:
        info = by_label[label].get("info")
        assert info and len(info) > 20 and "\n" not in info, label
