"""A real Chromium page against the app with --auth: Gradio's login page, an annotator chatting and voting
under their name without the admin tab, an admin with it, and Sign out back to the login page."""

from __future__ import annotations

import os

import pytest

from store import Store
from tests.servers import running_app
from tests.test_browser import browser, wait_for_pair  # noqa: F401 - browser is the shared fixture

pytestmark = pytest.mark.browser
PASSWORDS = {"root": "root-Pw-3c81e0aa", "ann": "ann-Pw-9d27b6f4"}
ADMIN_TAB = "Training loop (admin)"


@pytest.fixture(scope="module")
def auth_app(tiny_loaded, tmp_path_factory):
    db = tmp_path_factory.mktemp("auth-browser") / "auth.db"
    store = Store(db)
    store.add_user("root", "admin", PASSWORDS["root"])
    store.add_user("ann", "annotator", PASSWORDS["ann"])
    store.close()
    with running_app(tiny_loaded, db, extra_args=("--auth",)) as (url, service):
        yield url, service


def sign_in(page, url, name, password):
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def test_an_annotator_signs_in_chats_and_votes_under_their_name_without_the_admin_tab(auth_app, browser,
                                                                                      artifacts_dir):
    url, service = auth_app
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(url)
        page.get_by_role("button", name="Login").wait_for()
        assert page.locator("#message textarea").count() == 0  # nothing of the app before signing in
        page.get_by_label("username").fill("ann")
        page.get_by_label("password").fill("not-her-password")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials", exact=False).wait_for()
        page.screenshot(path=os.path.join(artifacts_dir, "login.png"), full_page=True)

        sign_in(page, url, "ann", PASSWORDS["ann"])
        page.wait_for_selector("#message textarea")
        page.wait_for_function("(document.querySelector('#account')?.innerText ?? '').includes('Signed in as ann')")
        assert "annotator" in page.locator("#account").inner_text()
        assert page.locator("#sign-out").is_visible()
        assert page.get_by_role("tab", name=ADMIN_TAB).count() == 0

        page.locator("#message textarea").fill("hello from the browser")
        page.locator("#send").click()
        wait_for_pair(page)
        page.locator("#vote-b").click()
        page.wait_for_function("(document.querySelector('#notice')?.innerText ?? '').includes('Saved: B is better')")
        rows = service.store._rows("select c.user, f.value from feedback f join turns t on t.id = f.turn_id "
                                   "join conversations c on c.id = t.conversation_id where t.user_message = ?",
                                   ["hello from the browser"])
        assert rows == [{"user": "ann", "value": "b"}]
        assert page.get_by_role("tab", name=ADMIN_TAB).count() == 0
        page.screenshot(path=os.path.join(artifacts_dir, "login_annotator.png"), full_page=True)

        page.locator("#sign-out").click()
        page.get_by_role("button", name="Login").wait_for()
        assert any(e["event"] == "sign_out" for e in service.store.auth_events("ann"))
    finally:
        page.close()


def test_an_admin_sees_the_admin_tab(auth_app, browser):
    url, _ = auth_app
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        sign_in(page, url, "root", PASSWORDS["root"])
        page.wait_for_function("document.querySelector('#account')?.innerText.includes('Signed in as root')")
        assert "admin" in page.locator("#account").inner_text()
        page.get_by_role("tab", name=ADMIN_TAB).wait_for()
    finally:
        page.close()
