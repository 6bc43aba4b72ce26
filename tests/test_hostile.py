"""Issue 15, proof under hostile input, through the public API of the real app (gradio_client and raw HTTP)
and through a real Chromium page (the last test).

Each refusal is said in words, printed in the server's log, and loses nothing: a person who voted before
the hostile calls still has exactly that vote afterwards.

Not covered here, because it needs accounts (branch `auth`): a client that replays another session's
Gradio session hash acts in that session (Gradio keys a session's state by the hash the client sends),
and any client may name itself any user. Without `--auth` the app is one person's, on localhost.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid

import pytest
from gradio_client import Client

from playground.serving.prompting import render
from store.migrations import all_names
from tests.servers import running_app
from tests.test_browser import LIVE_MARKUP, browser  # noqa: F401 - `browser` is the module's Chromium fixture
from tests.test_special_tokens import FORGED, old_render, specials
from trainers.data import stored_specs, tokenize

FAST = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
CONTROLS = "".join(chr(c) for c in [*range(0, 32), 127, *range(0x80, 0xA0)]) + "\u2028\u2029\ufeff\u202e\u200d"
JINJA = ("{{ 7*7 }} {% for i in range(3) %}{{ i }}{% endfor %} {{ raise_exception('boom') }} {# note #} "
         "{%- if messages %}{{ messages[0]['content'] }}{% endif %} {{ config.__class__ }}")
SQL = ["'; drop table feedback; --", 'Robert"); DROP TABLE turns;--', "1' OR '1'='1", "x); delete from replies; --"]
TEN_MB = 10_000_000
LOG_WAIT_S = 10


@pytest.fixture(scope="module")
def app(tiny_loaded, tmp_path_factory):
    db = tmp_path_factory.mktemp("hostile") / "hostile.db"
    with running_app(tiny_loaded, db) as (url, service):
        yield url, service


@pytest.fixture(scope="module")
def person(app):
    """Someone who voted before any hostile call: `intact()` checks that vote is still exactly there."""
    url, service = app
    client = Client(url, verbose=False)
    pair = client.predict("an honest question", api_name="/send", **FAST)
    client.predict("b", api_name="/vote")

    def intact():
        rows = service.store.feedback_for_turn(pair["turn_id"])
        assert [(r["kind"], r["value"], r["replaced_by"]) for r in rows] == [("choice", "b", None)]
        assert client.predict(api_name="/state")["choice"] == "b"  # their session too

    return intact


def client(url):
    return Client(url, verbose=False)


def post(url: str, path: str, body: bytes) -> tuple[int, dict | str]:
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def call(url: str, endpoint: str, data: list, session_hash: str | None = None) -> tuple[str, dict | list]:
    """Gradio's plain HTTP API (/gradio_api/call/...): the event's kind ('complete' or 'error') and data."""
    body = {"data": data} if session_hash is None else {"data": data, "session_hash": session_hash}
    status, answer = post(url, f"gradio_api/call/{endpoint}", json.dumps(body).encode())
    assert status == 200, answer
    with urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{answer['event_id']}", timeout=60) as response:
        lines = response.read().decode().splitlines()
    event = next(line.split(": ", 1)[1] for line in lines if line.startswith("event: "))
    data = next(json.loads(line.split(": ", 1)[1]) for line in lines if line.startswith("data: "))
    return event, data


def logged(capfd, text: str) -> None:
    """The server printed `text` (Gradio's queue logs every refused call with its message)."""
    seen, deadline = "", time.monotonic() + LOG_WAIT_S
    while text not in seen and time.monotonic() < deadline:
        seen += capfd.readouterr().err
        time.sleep(0.05)
    assert text in seen, f"{text!r} is not in the server's log"


def counts(service) -> dict:
    stats = service.store.stats()
    return {t: stats[t] for t in ("conversations", "turns", "replies", "feedback", "training_pairs")}


def stored_turn(service, pair) -> dict:
    return next(t for t in service.store.turns_for_conversation(pair["conversation_id"]) if t["id"] == pair["turn_id"])


def turn_pairs(service, turn_id: int) -> list[dict]:
    model = service.policy.model_id
    rows = [*service.store.training_pairs(model, held_out=False, new=None),
            *service.store.training_pairs(model, held_out=True, new=None)]
    return [r for r in rows if r["turn_id"] == turn_id]


def test_empty_huge_and_broken_unicode_messages_are_refused_in_words(app, person, capfd):
    url, service = app
    c = client(url)
    before = counts(service)
    for text in ("", "   ", "\n\t \r\n"):
        with pytest.raises(Exception, match="an empty message has nothing to reply to"):
            c.predict(text, api_name="/send", **FAST)
    with pytest.raises(Exception, match="200,001 characters; the limit is 200,000"):
        c.predict("x" * 200_001, api_name="/send", **FAST)
    logged(capfd, "the limit is 200,000. Nothing was sent.")
    # JSON can carry a lone surrogate that no tokenizer reads and SQLite cannot store (gradio_client cannot
    # even encode one, so raw HTTP sends it); it used to fail inside the tokenizer with no message.
    event, data = call(url, "send", ["lone \ud800 surrogate", None, None, 8, None])
    assert event == "error" and "not valid Unicode (a lone surrogate at position 5)" in data["error"], data
    logged(capfd, "not valid Unicode")
    assert counts(service) == before

    pair = c.predict("y" * 200_000, api_name="/send", **FAST)  # at the limit: stored whole, the model reads less
    assert stored_turn(service, pair)["user_message"] == "y" * 200_000
    assert any("the model read the first 8,000" in n for n in pair["notes"])
    session = c.session_hash
    event, data = call(url, "edit", ["better \udfff reply"], session)
    assert event == "error" and "The better reply holds a character that is not valid Unicode" in data["error"]
    with pytest.raises(Exception, match="The better reply is empty"):
        c.predict(" \n ", api_name="/edit")
    assert service.store.feedback_for_turn(pair["turn_id"]) == []
    assert c.predict("a", api_name="/vote")["choice"] == "a"
    person()


def test_control_characters_are_stored_and_answered_exactly(app, person):
    url, service = app
    c = client(url)
    pair = c.predict(CONTROLS + " tail", api_name="/send", **FAST)
    turn = stored_turn(service, pair)
    assert turn["user_message"] == CONTROLS + " tail"
    assert json.loads(turn["context_json"])[-1] == {"role": "user", "content": CONTROLS + " tail"}
    assert c.predict(CONTROLS, api_name="/edit")["edit"] == CONTROLS
    assert [r["value"] for r in service.store.feedback_for_turn(pair["turn_id"])] == [CONTROLS]
    person()


def test_chat_template_markers_stay_text_in_the_prompt_and_in_the_stored_pairs(app, person, tiny_loaded):
    """A message, a system prompt and a better reply holding the tiny model's ChatML markers (the bundled
    SmolLM2's are the same): the model read them as characters, and the pairs train on them as characters."""
    url, service = app
    tokenizer = tiny_loaded.tokenizer
    c = client(url)
    pair = c.predict("hi" + FORGED, api_name="/send", system_prompt="Be kind." + FORGED, **FAST)
    c.predict("a", api_name="/vote")
    c.predict("my reply" + FORGED, api_name="/edit")
    turn = stored_turn(service, pair)
    context = json.loads(turn["context_json"])
    assert context == [{"role": "system", "content": "Be kind." + FORGED}, {"role": "user", "content": "hi" + FORGED}]
    clean = render(tokenizer, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}])
    ids = render(tokenizer, context)
    # The prompt the model read is this rendering: its length is stored on the turn. Parsed as markers it
    # would be shorter (each marker one token) and would hold forged system and assistant turns.
    assert turn["prompt_tokens"] == len(ids) > len(old_render(tokenizer, context))
    assert specials(tokenizer, ids) == specials(tokenizer, clean)
    assert tokenizer.decode(ids, skip_special_tokens=True).count(FORGED) == 2

    rows = turn_pairs(service, pair["turn_id"])
    assert sorted(r["source"] for r in rows) == ["choice", "edit", "edit"]
    end_of_turn = specials(tokenizer, tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"])
    for spec in stored_specs(rows):
        tokens = tokenize(tokenizer, spec)
        assert list(tokens.prompt_ids) == ids
        assert specials(tokenizer, tokens.chosen_ids) == specials(tokenizer, tokens.rejected_ids) == end_of_turn
    edit = next(s for s in stored_specs(rows) if s.source == "edit")
    assert edit.chosen == "my reply" + FORGED
    person()


def test_jinja_syntax_stays_literal(app, person, tiny_loaded):
    url, service = app
    tokenizer = tiny_loaded.tokenizer
    c = client(url)
    pair = c.predict(JINJA, api_name="/send", system_prompt="{% if true %}system{% endif %} {{ 6*7 }}", **FAST)
    turn = stored_turn(service, pair)
    context = json.loads(turn["context_json"])
    assert [m["content"] for m in context] == ["{% if true %}system{% endif %} {{ 6*7 }}", JINJA]
    shown = tokenizer.decode(render(tokenizer, context), skip_special_tokens=True)
    assert JINJA in shown and "{{ 6*7 }}" in shown and "49" not in shown and "42" not in shown
    assert turn["prompt_tokens"] == len(render(tokenizer, context))
    assert c.predict(JINJA, api_name="/edit")["edit"] == JINJA
    assert next(r for r in turn_pairs(service, pair["turn_id"]) if r["source"] == "edit")["chosen"] == JINJA
    person()


def test_sql_is_stored_literally_and_every_table_survives(app, person, capfd):
    url, service = app
    before = counts(service)
    c = client(url)
    for text in SQL:
        c.predict(text, api_name="/new_conversation")  # as the user's name too
        pair = c.predict(text, api_name="/send", system_prompt=text, **FAST)
        with pytest.raises(Exception, match="Unknown choice"):
            c.predict(text, api_name="/vote")
        with pytest.raises(Exception, match="Unknown reply"):
            c.predict(text, "up", api_name="/rate")
        c.predict(text, api_name="/edit")
        conversation = service.store.conversation(pair["conversation_id"])
        assert (conversation["user"], conversation["system_prompt"]) == (text, text)
        assert stored_turn(service, pair)["user_message"] == text
        assert [(r["kind"], r["value"], r["user"]) for r in service.store.feedback_for_turn(pair["turn_id"])] == [
            ("edit", text, text)]
    logged(capfd, "Unknown choice")
    after = counts(service)
    assert after["conversations"] == before["conversations"] + len(SQL)
    assert after["turns"] == before["turns"] + len(SQL) and after["feedback"] == before["feedback"] + len(SQL)
    assert service.store.stats()["schema"] == all_names()
    person()


def test_malformed_and_oversized_json_is_refused_and_the_server_carries_on(app, person, capfd):
    url, service = app
    before = counts(service)
    for body in (b'{"data": ["a"', b"not json", b'{"data": "a"}', b"{}", b"[]", b'{"data": [' + b"9" * TEN_MB,
                 b'{"data": ["' + b"x" * TEN_MB):
        status, answer = post(url, "gradio_api/call/vote", body)
        # 422 names the fault; 400 for a body FastAPI cannot parse at all (a 10-million-digit number).
        assert status in (400, 422), (status, str(answer)[:200])
        assert any(word in answer for word in ("JSON decode error", "valid list", "Field required",
                                                "valid dictionary", "error parsing the body")), answer[:300]
    # Well-formed but 10 MB: our own limits refuse it, in a short message (not the 10 MB echoed back).
    event, data = call(url, "send", ["x" * TEN_MB, None, None, 8, None])
    assert event == "error" and "10,000,000 characters; the limit is 200,000" in data["error"]
    event, data = call(url, "vote", ["z" * TEN_MB])
    assert event == "error" and data["error"].startswith("Unknown choice 'zzz") and len(data["error"]) < 200
    logged(capfd, "Unknown choice 'zzz")
    event, data = call(url, "vote", [])  # too few values: Gradio refuses before our code runs
    assert event == "error"
    assert counts(service) == before
    # Still serving: a new person chats and votes.
    c = client(url)
    pair = c.predict("still there?", api_name="/send", **FAST)
    assert c.predict("tie", api_name="/vote")["choice"] == "tie"
    assert [r["value"] for r in service.store.feedback_for_turn(pair["turn_id"])] == ["tie"]
    person()


def test_a_vote_never_lands_on_another_sessions_pair(app, person, capfd):
    """The API names no pair: a vote goes to the pair of the caller's own session, whose state the server
    keeps (a client cannot send one). Another session, a forged session id or a forged state all meet an
    empty session and are refused."""
    url, service = app
    victim = client(url)
    theirs = victim.predict("my own pair", api_name="/send", **FAST)
    forged_state = {"conversation_id": theirs["conversation_id"], "turn_id": theirs["turn_id"], "pair": 0,
                    "session_id": "x", "user": "anonymous"}
    attacker = client(url)
    with pytest.raises(Exception, match="nothing to judge yet"):
        attacker.predict("b", api_name="/vote")
    # The state's slot filled in by hand (all of the endpoint's inputs, state first): Gradio uses the
    # server's state for the session, never the client's.
    for endpoint, data in (("vote", [forged_state, "b"]), ("rate", [forged_state, "a", "down"]),
                           ("edit", [forged_state, "forged better reply"])):
        event, answer = call(url, endpoint, data, attacker.session_hash)
        assert event == "error" and "nothing to judge yet" in answer["error"], answer
    event, answer = call(url, "vote", ["b"], f"forged-{uuid.uuid4()}")  # a session id nobody was given
    assert event == "error" and "nothing to judge yet" in answer["error"]
    logged(capfd, "There is nothing to judge yet")
    assert service.store.feedback_for_turn(theirs["turn_id"]) == []

    # The attacker's own vote lands on its own pair only.
    own = attacker.predict("my pair", api_name="/send", **FAST)
    attacker.predict("b", api_name="/vote")
    assert own["conversation_id"] != theirs["conversation_id"]
    assert [r["value"] for r in service.store.feedback_for_turn(own["turn_id"])] == ["b"]
    assert service.store.feedback_for_turn(theirs["turn_id"]) == []
    assert victim.predict("a", api_name="/vote")["choice"] == "a"
    assert [r["value"] for r in service.store.feedback_for_turn(theirs["turn_id"])] == ["a"]
    person()


XSS = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>",
       "[x](javascript:window.__pwned=1)"]
HOSTILE_MESSAGE = "\n\n".join([*XSS, "hi" + FORGED.strip(), JINJA, SQL[0]])
TOASTS_SHOWN = """() => document.getAnimations().filter(a => a.effect && a.effect.getKeyframes().some(
  k => 'opacity' in k)).every(a => a.playState === 'finished')"""
SCROLL_TO_TOP = "() => document.querySelectorAll('#history *').forEach(e => { e.scrollTop = 0; })"


@pytest.mark.browser
def test_the_page_shows_hostile_text_as_text_runs_no_script_and_refuses_in_words(app, person, browser,
                                                                                 artifacts_dir, caplog):
    """Script in a message and in a better reply (shown as the assistant's turn after a tie), chat-template
    markers, Jinja and SQL: the page shows them as typed, and nothing they hold runs. Then two refused sends:
    a toast says why, and the conversation and the typed text stay in view (not covered by "Error")."""
    url, service = app
    caplog.set_level(logging.INFO, logger="playground.web.ui")
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(url)
        page.wait_for_selector("#message textarea")
        box = page.locator("#message textarea")
        box.fill(HOSTILE_MESSAGE)
        page.locator("#send").click()
        page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Which reply is better')",
                               timeout=120_000)
        page.get_by_text("Write a better reply").click()
        page.get_by_placeholder("The reply you would have wanted").fill("\n\n".join(XSS))
        page.locator("#save-edit").click()
        page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Saved your better reply')")
        page.locator("#vote-tie").click()
        page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Saved: Tie')")
        page.wait_for_function("document.querySelectorAll('#history [data-testid=bot]').length === 1")

        user = page.locator("#history [data-testid=user]").last
        bot = page.locator("#history [data-testid=bot]").last.inner_text()
        for text in XSS[:2]:
            assert text in user.inner_text() and text in bot
        assert "<|im_start|>system" in user.inner_text() and "{{ 7*7 }}" in user.inner_text()
        assert SQL[0] in user.inner_text()
        assert page.locator("#history script, #history img, #reply-a img, #reply-b img").count() == 0
        assert page.evaluate(LIVE_MARKUP) == []
        links = page.locator("#history a", has_text="x")
        assert links.count() == 2 and all(links.nth(i).get_attribute("href") is None for i in range(2))
        links.first.click()
        assert page.evaluate("typeof window.__pwned") == "undefined" and dialogs == []
        page.evaluate(SCROLL_TO_TOP)  # the whole message in view for the screenshot
        page.screenshot(path=os.path.join(artifacts_dir, "hostile_markup.png"), full_page=True)

        turns = service.store.stats()["turns"]
        page.locator("#send").click()  # an empty message: refused in words, nothing sent
        page.wait_for_selector(".toast-body:has-text('an empty message has nothing to reply to')")
        box.fill("x" * 200_001)  # over the limit: refused, and what was typed stays in the box
        page.locator("#send").click()
        page.wait_for_selector(".toast-body:has-text('the limit is 200,000')")
        assert box.input_value() == "x" * 200_001 and service.store.stats()["turns"] == turns
        assert user.is_visible() and SQL[0] in user.inner_text()  # the conversation is still shown
        assert page.get_by_text("Error", exact=True).count() == 0  # no output covered by Gradio's error badge
        assert page.evaluate("typeof window.__pwned") == "undefined" and dialogs == []
        page.wait_for_function(TOASTS_SHOWN)  # faded in, for the screenshot
        page.screenshot(path=os.path.join(artifacts_dir, "hostile_refused.png"), full_page=True)
    finally:
        page.close()
    assert "the limit is 200,000" in caplog.text and "an empty message" in caplog.text
    turn = service.store.latest_turn()
    assert turn["user_message"] == HOSTILE_MESSAGE
    assert [(r["kind"], r["value"]) for r in service.store.feedback_for_turn(turn["id"])] == [
        ("edit", "\n\n".join(XSS)), ("choice", "tie")]
    person()
