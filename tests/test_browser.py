"""A real Chromium page against the real app on the bundled model: chat (Enter sends), stream, vote,
markdown rendered, and no XSS."""

from __future__ import annotations

import os
import time

import pytest

from tests.servers import running_app

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
PAYLOAD = ('<script>window.__xss = "script"</script> <img src=x onerror="window.__xss = \'img\'"> '
           '[click me](javascript:window.__xss="link") **bold?**')
# Typed line by line with Shift+Enter between lines: markdown, a tag in a code span, an indented code block.
MARKDOWN_LINES = ["Say **hi** and show `<b>x</b>` & <i>", "```python", "if a < b:", "    go()", "```"]
MARKDOWN = "\n".join(MARKDOWN_LINES)
# Any element in the chat panels with an inline event handler (onerror, onclick, ...) or a javascript: URL.
LIVE_MARKUP = """
() => [...document.querySelectorAll('#history *, #reply-a *, #reply-b *')].filter(e => [...e.attributes].some(
  a => a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value))).map(e => e.outerHTML)
"""
STREAM_RECORDER = """
() => {
  window.__frames = [];
  const target = document.querySelector('#reply-a');
  new MutationObserver(() => window.__frames.push(target.innerText)).observe(
    target, {subtree: true, childList: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def browser():
    """One Playwright driver and Chromium for the module (a second sync driver in one thread is refused)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make setup-test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page_and_app(bundled_loaded, tmp_path_factory, browser):
    db = tmp_path_factory.mktemp("browser") / "browser.db"
    with running_app(bundled_loaded, db) as (url, service):
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url)
        page.wait_for_selector("#message textarea")
        yield page, service, dialogs
        page.close()


def send_and_wait(page, text):
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
    wait_for_pair(page)


def wait_for_pair(page):
    # Both replies finished and stored: the notice asks for a vote and the vote buttons come alive.
    page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Which reply is better')",
                           timeout=120_000)
    page.wait_for_selector("#vote-a:not([disabled])")


def test_chat_streams_two_replies_and_a_vote_lands_in_sqlite(page_and_app, artifacts_dir):
    page, service, _ = page_and_app
    page.evaluate(STREAM_RECORDER)
    started = time.time()
    send_and_wait(page, "Give me three tips for staying focused while studying.")
    frames = page.evaluate("window.__frames")
    texts_a = page.locator("#reply-a").inner_text()
    texts_b = page.locator("#reply-b").inner_text()
    assert len(set(frames)) >= 3, f"reply A did not stream (saw {len(set(frames))} states)"
    assert len(texts_a.strip()) > 0 and len(texts_b.strip()) > 0 and texts_a != texts_b
    assert "v0" in page.locator("#badge-a").inner_text() and "tokens" in page.locator("#badge-b").inner_text()

    page.locator("#vote-a").click()
    page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Saved: A is better')")
    stats = service.store.stats()
    assert stats["feedback"] == 1 and stats["current_feedback"] == {"choice": {"a": 1}}
    page.screenshot(path=os.path.join(artifacts_dir, "chat_after_vote.png"), full_page=True)
    assert time.time() - started < 300


def test_enter_sends_shift_enter_adds_a_line_and_the_vote_picks_what_the_conversation_shows(page_and_app,
                                                                                           artifacts_dir):
    page, service, _ = page_and_app
    page.locator("#new-conversation").click()
    page.wait_for_function("!document.querySelector('#history [data-testid=user], #history [data-testid=bot]')")
    turns = service.store.stats()["turns"]
    box = page.locator("#message textarea")
    box.click()
    for i, line in enumerate(MARKDOWN_LINES):
        if i:
            box.press("Shift+Enter")
        box.press_sequentially(line)
    # Shift+Enter added lines and sent nothing (a send would show the message and, once done, clear the box).
    assert box.input_value() == MARKDOWN
    assert page.locator("#history [data-testid=user]").count() == 0 and service.store.stats()["turns"] == turns

    box.press("Enter")
    wait_for_pair(page)
    assert service.store.latest_turn()["user_message"] == MARKDOWN and box.input_value() == ""

    # The message renders as markdown; the tag stays text (in the code span and in prose); code keeps its indent.
    user = page.locator("#history [data-testid=user]")
    assert user.locator("strong").inner_text() == "hi"
    assert user.locator("p code").inner_text() == "<b>x</b>" and "& <i>" in user.locator("p").inner_text()
    assert user.locator("b, i").count() == 0
    assert "if a < b:\n    go()" in user.locator("pre code").inner_text()

    # Before the vote the conversation ends at the message: reply A is not repeated there as the answer.
    reply_a = page.locator("#reply-a [data-testid=bot]").inner_text().strip()
    reply_b = page.locator("#reply-b [data-testid=bot]").inner_text().strip()
    assert reply_a and reply_b  # (they may be equal: the real model sometimes echoes the code block in both)
    assert page.locator("#history [data-testid=bot]").count() == 0
    # Outside the person's message (which a reply may quote whole), nothing of reply A is in the conversation.
    assert reply_a not in page.locator("#history").inner_text().replace(user.inner_text(), "")
    page.screenshot(path=os.path.join(artifacts_dir, "chat_before_vote.png"), full_page=True)

    page.locator("#vote-b").click()
    page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Saved: B is better')")
    page.wait_for_function("document.querySelectorAll('#history [data-testid=bot]').length === 1")
    assert page.locator("#history [data-testid=bot]").inner_text().strip() == reply_b
    page.screenshot(path=os.path.join(artifacts_dir, "chat_enter_vote_b.png"), full_page=True)


def test_markup_is_shown_as_text_and_never_runs(page_and_app, artifacts_dir):
    page, service, dialogs = page_and_app
    send_and_wait(page, PAYLOAD)
    user = page.locator("#history [data-testid=user]").last
    history = user.inner_text()
    # Markdown is on (so the payload meets the real renderer), and the HTML in it shows as typed.
    assert user.locator("strong").inner_text() == "bold?"
    assert '<script>window.__xss = "script"</script>' in history
    assert "<img src=x onerror=" in history
    assert page.locator("#history img[src='x'], #history script").count() == 0
    # The markdown link renders, with its javascript: URL stripped by the sanitiser; clicking it runs nothing.
    link = user.locator("a", has_text="click me")
    assert link.count() == 1 and link.get_attribute("href") is None
    link.click()
    assert page.evaluate(LIVE_MARKUP) == []
    assert page.locator('a[href^="javascript:"]').count() == 0
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    assert service.store.latest_turn()["user_message"] == PAYLOAD
    page.locator("#vote-b").click()
    page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Saved: B is better')")
    assert page.evaluate("window.__xss") is None and dialogs == []
    page.screenshot(path=os.path.join(artifacts_dir, "chat_markup.png"), full_page=True)


def test_admin_autopilot_trains_a_version_that_goes_live_in_the_page(tiny_loaded, tmp_path, artifacts_dir, browser):
    """The demo path: open the admin panel, start the autopilot, watch v1 go live, roll back."""
    from tests.test_loop import loop_settings

    settings = loop_settings(tmp_path, min_new_pairs=6)
    with running_app(tiny_loaded, tmp_path / "admin.db", loop_settings=settings) as (url, service, loop):
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(url)
        page.get_by_role("tab", name="Training loop (admin)").click()
        page.locator("#autopilot-start").click()
        page.wait_for_function("(document.querySelector('#admin-note')?.innerText ?? '').includes('Autopilot started')")
        # The autopilot votes until 6 pairs wait (ties make none), then the round trains: a bound for a loaded
        # machine, the wait ends when v1 is live.
        page.wait_for_function("(document.querySelector('#loop-status')?.innerText ?? '').includes('Live policy v1')",
                               timeout=300_000)
        page.wait_for_function("(document.querySelector('#autopilot-status')?.innerText ?? '').includes('votes by')")
        page.wait_for_selector(".toast-body", timeout=10_000)  # the 'new version is live' toast
        page.locator("#autopilot-stop").click()
        # The round's curves are drawn, with a legend naming the metrics (an empty first frame once left
        # the plots with axes but no coloured lines).
        for plot, metric in (("#curves", "rewards/margins"), ("#logp-curves", "logps/rejected")):
            page.wait_for_function(f"(document.querySelector('{plot}')?.textContent ?? '').includes('{metric}')",
                                   timeout=20_000)
        page.screenshot(path=os.path.join(artifacts_dir, "admin_autopilot.png"), full_page=True)

        page.locator("#version-pick input").fill("v0")
        page.locator("#version-pick input").press("Enter")
        page.locator("#rollback").click()
        page.wait_for_function("(document.querySelector('#admin-note')?.innerText ?? '').includes('v0 is live')")
        assert loop.policy.snapshot().version == "v0"
        users = {c["user"] for c in service.store.conversations()}
        assert users and all(u.startswith("sim-concise-") for u in users)
        page.close()


def test_admin_picks_ppo_a_round_goes_live_and_best_of_n_badges_the_replies(tiny_loaded, tiny_model_dir, tmp_path,
                                                                           artifacts_dir, browser):
    """The classic path in the page: pick PPO in the admin panel, Train now, watch the round's curves and
    the reward-model table, chat with the PPO version, turn best-of-n on and see its badge."""
    import json

    from tests.test_classic_path import PPO, REWARD, marked_store
    from tests.test_loop import loop_settings
    from trainers.run import parse_args, run_round

    marked_store(tmp_path / "ppo.db", tiny_loaded.model_id, 120).close()
    _, summary = run_round(parse_args([
        "--algo", "reward", "--db", str(tmp_path / "ppo.db"), "--reward-models-dir", str(tmp_path / "reward_models"),
        "--model", str(tiny_model_dir), "--config", json.dumps(REWARD), "--no-progress"]))
    assert summary["reward_model"] == "r1" and summary["status"] == "succeeded", summary
    settings = loop_settings(tmp_path, min_new_pairs=1000, reward_models_dir=str(tmp_path / "reward_models"))
    with running_app(tiny_loaded, tmp_path / "ppo.db", loop_settings=settings) as (url, service, loop):
        page = browser.new_page(viewport={"width": 1280, "height": 1900})
        page.goto(url)
        page.get_by_role("tab", name="Training loop (admin)").click()
        # The DPO settings show the app's default assumed misclicks, with what the setting trades.
        from trainers.defaults import DEFAULT_LABEL_SMOOTHING

        smoothing = page.get_by_label("assumed misclicks (label smoothing)")
        assert float(smoothing.input_value()) == DEFAULT_LABEL_SMOOTHING
        assert "trusts every click" in page.locator("#admin").inner_text()
        from trainers.dpo import DPOConfig

        imitate = page.get_by_label("learn better replies as examples")
        assert float(imitate.input_value()) == DPOConfig().edit_sft_weight
        assert "drifts from the base model sooner" in page.locator("#admin").inner_text()
        page.locator("#algo").get_by_label("ppo").check()
        page.locator("#apply-settings").click()
        page.wait_for_function("(document.querySelector('#admin-note')?.innerText ?? '').includes('trains with PPO')")
        assert loop.settings.algo == "ppo"
        loop.set_next_config(PPO)  # the tiny model's settings (the panel sets a few of them)
        page.locator("#train-now").click()
        # The autopilot votes until 6 pairs wait (ties make none), then the round trains: a bound for a loaded
        # machine, the wait ends when v1 is live.
        page.wait_for_function("(document.querySelector('#loop-status')?.innerText ?? '').includes('Live policy v1')",
                               timeout=300_000)
        for plot, metric in (("#ppo-curves", "score/mean"), ("#ppo-health", "clip_fraction")):
            page.wait_for_function(f"(document.querySelector('{plot}')?.textContent ?? '').includes('{metric}')",
                                   timeout=20_000)
        page.wait_for_function("(document.querySelector('#reward-models')?.innerText ?? '').includes('r1')")
        page.wait_for_function("(document.querySelector('#runs')?.innerText ?? '').includes('ppo')")
        page.locator("#best-of-n input").fill("2")
        page.locator("#apply-best-of-n").click()
        page.wait_for_function("(document.querySelector('#admin-note')?.innerText ?? '').includes('best of 2')")
        page.screenshot(path=os.path.join(artifacts_dir, "admin_ppo.png"), full_page=True)

        page.get_by_role("tab", name="Chat").click()
        page.locator("#message textarea").fill("hello after ppo")
        page.locator("#send").click()
        wait_for_pair(page)
        badge = page.locator("#badge-a").inner_text()
        assert "v1" in badge and "best of 2 by r1" in badge, badge
        page.screenshot(path=os.path.join(artifacts_dir, "chat_best_of_n.png"), full_page=True)
        assert service.store.version(service.policy.model_id, "v1")["algo"] == "ppo"
        page.close()


def demo_store(db_path, model_id):
    """A store three versions into a demo: evaluations of v0..v3 that drift further each time, arena votes
    that favour the newer versions, ordinary votes and a round with its staleness."""
    import numpy as np

    from store import Store
    from tests.test_dashboard import add_evaluation, turn, with_versions

    store = Store(db_path)
    store.ensure_base_version(model_id)
    # Live stays v0: the app restores the live version at start, and these versions have no adapter files.
    with_versions(store, "v1", "v2", "v3", model=model_id)
    store.record_live(model_id, "v0", "rollback")
    rng = np.random.default_rng(0)
    centre = np.zeros(16)
    for k, version in enumerate(["v0", "v1", "v2", "v3"]):
        centre[k] = 1.0
        vectors = [centre + 0.3 * rng.standard_normal(16) for _ in range(16)]
        texts = [" ".join(["word"] * (5 + 3 * k) + [f"w{i % (8 - k)}"]) for i in range(16)]
        lengths = [int(n) for n in rng.normal(40 + 25 * k, 8, 16)]
        add_evaluation(store, version, vectors, [0.0] * 16 if k == 0 else list(rng.gamma(2.0, k, 16)),
                       parent=None if k == 0 else f"v{k - 1}", texts=texts, model=model_id, n_tokens=lengths,
                       finish="length" if k == 3 else "stop")
    c = store.start_conversation("s", "ann", model_id, "")
    idx = 0
    for k, version in enumerate(["v1", "v2", "v3"], start=1):
        for i in range(12):
            newer_wins = i < 6 + k
            turn(store, c, idx, ("short", version), ("a longer reply", "v0"), "a" if newer_wins else "b",
                 user=["ann", "bob", "cy"][i % 3], model=model_id)
            idx += 1
    for i in range(10):
        turn(store, c, idx, ("one two three", "v3"), ("one", "v3"), "a" if i % 3 else "b", user="dee", model=model_id)
        idx += 1
    run = store.create_run("dpo", {}, model_id, "v2", "schedule")
    store.finish_run(run, "succeeded", version="v3", metrics={"staleness": {
        "n": 40, "share_older": 0.45, "mean_lag": 0.6, "off_policy_gap": 2.1, "n_gap": 30, "by_version": {}}})
    store.close()


def test_the_dashboard_tab_draws_the_demo_store(tiny_loaded, tmp_path, artifacts_dir, browser):
    """The Dashboard tab on a store three versions in: the headline in words, the plots drawn, the
    leaderboard filled; a screenshot to look at."""
    db = tmp_path / "demo.db"
    demo_store(db, tiny_loaded.model_id)
    with running_app(tiny_loaded, db) as (url, service):
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url)
        page.get_by_role("tab", name="Dashboard").click()
        page.wait_for_function("!(document.querySelector('#dashboard-headline')?.innerText ?? '').includes('Loading')",
                               timeout=60_000)
        for key in ("kl", "win_rate", "frontier", "length", "diversity", "staleness"):
            page.wait_for_selector(f"#dashboard-{key} img", timeout=30_000)
        assert "v0 (the base model) is live" in page.locator("#dashboard-headline").inner_text()
        assert "v3" in page.locator("#dashboard-table-leaderboard").inner_text()
        page.screenshot(path=os.path.join(artifacts_dir, "dashboard.png"), full_page=True)
        page.close()


def test_a_refused_message_keeps_the_box_and_a_withheld_pair_shows_why_not_its_text(tiny_loaded, tmp_path, browser,
                                                                                   artifacts_dir):
    args = ("--moderation", "tests.moderation_hooks:strict")
    with running_app(tiny_loaded, tmp_path / "moderated.db", extra_args=args) as (url, service):
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        try:
            page.goto(url)
            box = page.locator("#message textarea")
            box.fill("Tell me something forbidden")
            page.locator("#send").click()
            page.wait_for_function("[...document.querySelectorAll('.toast-body')].some(t => t.innerText.includes("
                                   "'it mentions the forbidden topic'))", timeout=30_000)
            assert box.input_value() == "Tell me something forbidden"  # nothing typed is lost
            assert [t["user_message"] for t in service.store.refused_turns()] == ["Tell me something forbidden"]

            box.fill("hello")
            page.locator("#send").click()
            page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('cannot be judged')",
                                   timeout=60_000)
            for slot in ("a", "b"):
                assert "Withheld by the moderation check: replies are withheld on this test server" in \
                    page.locator(f"#reply-{slot}").inner_text()
                assert page.locator(f"#vote-{slot}").is_disabled()
            assert page.locator("#regenerate").is_enabled()
            stored = [r["text"] for r in service.store.replies_for_turn(service.store.latest_turn()["id"])]
            shown = page.locator("#reply-a").inner_text() + page.locator("#reply-b").inner_text()
            assert all(text.strip() not in shown for text in stored if len(text.strip()) > 3)
            page.screenshot(path=os.path.join(artifacts_dir, "moderation_withheld.png"), full_page=True)
        finally:
            page.close()
