"""Accounts and roles: scrypt-hashed passwords, the users command, and the real app with --auth driven by
gradio_client (sign-in, refusals, roles, names on votes, forged sessions, expiry, sign-out)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from app import SetupError, parse_args
from playground.web.auth import ADMIN_ONLY, NOT_SIGNED_IN, NOT_YOUR_SESSION
from store import Store
from store.__main__ import main as store_main
from store.accounts import AccountError, hash_password, password_matches
from tests.servers import running_app

REPO = Path(__file__).resolve().parent.parent
# Distinctive passwords, so a search of logs, messages and database bytes cannot miss one.
PASSWORDS = {"root": "root-Pw-7f3a9c21", "ann": "ann-Pw-51d0e8b4", "bob": "bob-Pw-a6c2f193", "gone": "gone-Pw-0b9e44d7"}
ROLES = {"root": "admin", "ann": "annotator", "bob": "annotator", "gone": "annotator"}
SESSION_HOURS = 1.0
FAST = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}


class Clock:
    """The sign-in clock, moved by the test: expiry is tested without waiting an hour."""

    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_accounts(db: Path, names=("root", "ann", "bob", "gone")) -> None:
    store = Store(db)
    for name in names:
        store.add_user(name, ROLES[name], PASSWORDS[name])
    if "gone" in names:
        store.disable_user("gone")
    store.close()


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def app(tiny_loaded, tmp_path_factory, clock):
    db = tmp_path_factory.mktemp("auth") / "auth.db"
    make_accounts(db)
    with running_app(tiny_loaded, db, extra_args=("--auth", "--session-hours", str(SESSION_HOURS)),
                     clock=clock) as (url, service):
        yield url, service, db


def sign_in(url, name, password=None) -> Client:
    return Client(url, auth=(name, PASSWORDS[name] if password is None else password), verbose=False)


def refused(fn, message: str) -> str:
    with pytest.raises(Exception) as caught:
        fn()
    assert message in str(caught.value), str(caught.value)
    return str(caught.value)


def page_event(url: str, cookies: dict, api_name: str, data: list) -> dict:
    """Call one of the page's private events the way the browser does (queue/join by fn_index, then the
    event stream): a script can do the same, so the admin panel's buttons must refuse on the server."""
    session_hash = uuid.uuid4().hex
    with httpx.Client(base_url=url, cookies=cookies, timeout=60) as http:
        dependency = next(d for d in http.get("config").json()["dependencies"] if d.get("api_name") == api_name)
        joined = http.post("gradio_api/queue/join", json={"data": data, "fn_index": dependency["id"],
                                                          "session_hash": session_hash, "trigger_id": None,
                                                          "event_data": None})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError(f"{api_name}: the event stream ended without a result")


def db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


# -- the store and the command ----------------------------------------------------------------------


def test_a_password_is_stored_as_a_salted_scrypt_hash_and_checks_round_trip(tmp_path):
    stored = hash_password("correct horse")
    scheme, n, r, p, salt, key = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", 2 ** 14, 8, 5)
    assert password_matches("correct horse", stored) and not password_matches("correct horsE", stored)
    assert hash_password("correct horse") != stored  # a fresh salt each time
    assert not password_matches("correct horse", "not a hash") and not password_matches("x", "md5$1$2$3$4$5")

    db = tmp_path / "kdf.db"
    store = Store(db)
    store.add_user("ann", "annotator", PASSWORDS["ann"])
    assert store.verify("ann", PASSWORDS["ann"]) == "annotator"
    assert store.verify("ann", PASSWORDS["bob"]) is None and store.verify("nobody", PASSWORDS["ann"]) is None
    assert all("password_hash" not in u for u in store.users())
    for bad in (lambda: store.add_user("ann", "annotator", "another-pass"),  # taken
                lambda: store.add_user(" ann", "annotator", "another-pass"),
                lambda: store.add_user("x" * 65, "annotator", "another-pass"),
                lambda: store.add_user("eve\x00", "annotator", "another-pass"),
                lambda: store.add_user("eve", "root", "another-pass"),
                lambda: store.add_user("eve", "annotator", "short")):
        with pytest.raises(AccountError) as caught:
            bad()
        assert "another-pass" not in str(caught.value)
    store.disable_user("ann")
    assert store.verify("ann", PASSWORDS["ann"]) is None and store.role("ann") is None
    store.enable_user("ann")
    assert store.verify("ann", PASSWORDS["ann"]) == "annotator"
    store.close()
    raw = db_bytes(db)
    assert PASSWORDS["ann"].encode() not in raw and b"scrypt$16384$8$5$" in raw


def test_users_command_adds_lists_disables_and_enables(tmp_path, monkeypatch, capsys):
    db = tmp_path / "cli.db"
    # The real command line, as a script would run it: the password on standard input.
    done = subprocess.run([sys.executable, "-m", "store", "users", "add", "root", "--role", "admin", "--password-stdin",
                           "--db", str(db)], input=PASSWORDS["root"] + "\n", capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "added admin 'root'" in done.stdout and PASSWORDS["root"] not in done.stdout + done.stderr

    # At a terminal: asked twice; two different answers save nothing.
    answers = iter([PASSWORDS["ann"], PASSWORDS["ann"] + "x"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert store_main(["users", "add", "ann", "--db", str(db)]) == 1
    assert "differ" in capsys.readouterr().err
    answers = iter([PASSWORDS["ann"]] * 2)
    assert store_main(["users", "add", "ann", "--role", "annotator", "--db", str(db)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert store_main(["users", "add", "bob", "--password-stdin", "--db", str(db)]) == 1
    assert "8 to 1024 characters" in capsys.readouterr().err

    assert store_main(["users", "disable", "ann", "--db", str(db)]) == 0
    assert store_main(["users", "disable", "nobody", "--db", str(db)]) == 1
    capsys.readouterr()
    assert store_main(["users", "list", "--json", "--db", str(db)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [("root", "admin", False),
                                                                       ("ann", "annotator", True)]
    assert all(set(u) == {"name", "role", "disabled", "created_at", "disabled_at"} for u in listed)
    assert store_main(["users", "list", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    assert "ann" in table and "disabled" in table and "scrypt" not in table
    assert store_main(["users", "enable", "ann", "--db", str(db)]) == 0
    store = Store(db)
    assert store.verify("ann", PASSWORDS["ann"]) == "annotator" and store.verify("root", PASSWORDS["root"]) == "admin"
    store.close()
    assert not any(p.encode() in db_bytes(db) for p in PASSWORDS.values())


# -- who may listen where ---------------------------------------------------------------------------


def test_a_non_loopback_host_needs_auth_or_insecure(capsys):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert parse_args(["--host", host]).host == host
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(SystemExit) as exited:
            parse_args(["--host", host])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"--host {host} would let anyone" in err and "--auth" in err and "--insecure" in err
    assert parse_args(["--host", "0.0.0.0", "--auth"]).auth
    assert parse_args(["--host", "0.0.0.0", "--insecure"]).insecure
    with pytest.raises(SystemExit):
        parse_args(["--auth", "--session-hours", "0"])


def test_auth_without_an_admin_account_says_how_to_make_one(tiny_loaded, tmp_path):
    db = tmp_path / "no-admin.db"
    make_accounts(db, names=("ann",))
    with pytest.raises(SetupError) as caught:
        with running_app(tiny_loaded, db, extra_args=("--auth",)):
            pass
    assert "python -m store users add NAME --role admin" in str(caught.value) and str(db) in str(caught.value)


# -- the app with --auth ----------------------------------------------------------------------------


def test_every_endpoint_without_a_session_is_refused(app):
    url, _, _ = app
    with pytest.raises(Exception) as caught:
        Client(url, verbose=False)
    assert "login" in str(caught.value).lower()
    endpoints = sign_in(url, "root").view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = [name.lstrip("/") for name in endpoints]
    assert {"send", "vote", "new_conversation", "state", "train_now", "pause", "rollback", "training_status",
            "dashboard"} <= set(names)
    with httpx.Client(base_url=url, timeout=30) as http:
        for cookies in ({}, {"access-token-unsecure-x": "forged", "access-token-x": "forged"}):
            for name in names:
                answer = http.post(f"gradio_api/call/{name}", json={"data": []}, cookies=cookies)
                assert answer.status_code == 401, (name, answer.status_code)
            for path in ("config", "gradio_api/info", "gradio_api/queue/data?session_hash=x"):
                assert http.get(path, cookies=cookies).status_code == 401, path
            join = http.post("gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"},
                             cookies=cookies)
            assert join.status_code == 401


def test_a_wrong_password_an_unknown_name_and_a_disabled_account_are_refused(app):
    url, service, _ = app
    for name, password in (("ann", PASSWORDS["bob"]), ("nobody", PASSWORDS["ann"]), ("gone", PASSWORDS["gone"]),
                           ("ann", "")):
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=(name, password), verbose=False)
    refusals = [e for e in service.store.auth_events() if e["event"] == "sign_in_refused"]
    # An unknown name is not logged (it is often the password typed in the wrong box).
    assert {"ann", "gone", None} <= {e["user"] for e in refusals} and "nobody" not in json.dumps(refusals)


def test_votes_are_recorded_under_the_account_name_and_no_other(app):
    url, service, db = app
    ann = sign_in(url, "ann")
    sent = ann.predict("hello from ann", api_name="/send", **FAST)
    ann.predict("a", api_name="/vote")
    store = service.store
    assert store._rows("select user from conversations where id = ?", [sent["conversation_id"]]) == [{"user": "ann"}]
    assert {r["user"] for r in store._rows("select user from feedback f join turns t on t.id = f.turn_id "
                                           "where t.conversation_id = ?", [sent["conversation_id"]])} == {"ann"}

    # Naming someone else is refused and logged; naming yourself is fine.
    refused(lambda: ann.predict("bob", None, api_name="/new_conversation"), "signed in as 'ann'")
    assert any(e["event"] == "refused" and "as 'bob'" in e["detail"] for e in store.auth_events("ann"))
    ann.predict("ann", None, api_name="/new_conversation")
    second = ann.predict("again", api_name="/send", **FAST)
    assert store._rows("select user from conversations where id = ?", [second["conversation_id"]]) == [{"user": "ann"}]


def test_a_second_account_cannot_use_the_first_ones_session(app):
    url, service, _ = app
    ann, bob = sign_in(url, "ann"), sign_in(url, "bob")
    mine = ann.predict("ann's secret question", api_name="/send", **FAST)
    bob.session_hash = ann.session_hash  # a forged or replayed session id, with bob's own valid sign-in
    for call in (lambda: bob.predict(api_name="/state"), lambda: bob.predict("b", api_name="/vote"),
                 lambda: bob.predict("hijack", api_name="/send", **FAST)):
        refused(call, NOT_YOUR_SESSION)
    assert ann.predict(api_name="/state")["choice"] is None  # ann's pair is untouched, still hers to judge
    assert ann.predict("b", api_name="/vote")["choice"] == "b"
    assert service.store._rows("select count(*) as n from feedback f join turns t on t.id = f.turn_id where "
                               "t.conversation_id = ? and f.user = 'bob'", [mine["conversation_id"]])[0]["n"] == 0
    assert any(e["event"] == "refused" and "session of 'ann'" in e["detail"] for e in service.store.auth_events("bob"))


def test_disabling_a_signed_in_account_ends_its_session_at_once(app):
    url, service, _ = app
    bob = sign_in(url, "bob")
    bob.predict(api_name="/state")
    service.store.disable_user("bob")
    try:
        with pytest.raises(Exception):
            bob.predict(api_name="/state")
        with httpx.Client(base_url=url, timeout=30, cookies=bob.cookies) as http:
            assert http.get("config").status_code == 401  # the read-only routes too
        assert any(e["event"] == "refused" and "disabled" in (e["detail"] or "")
                   for e in service.store.auth_events("bob"))
    finally:
        service.store.enable_user("bob")
    sign_in(url, "bob").predict(api_name="/state")


def test_a_session_expires_and_signing_in_again_works(app, clock):
    url, service, _ = app
    ann = sign_in(url, "ann")
    ann.predict(api_name="/state")
    clock.now += SESSION_HOURS * 3600 - 1
    ann.predict(api_name="/state")  # a second before the end: still signed in
    clock.now += 2
    with pytest.raises(Exception) as caught:
        ann.predict(api_name="/state")
    assert "401" in str(caught.value) or "login" in str(caught.value).lower() or NOT_SIGNED_IN in str(caught.value)
    assert any(e["event"] == "expired" for e in service.store.auth_events("ann"))
    sign_in(url, "ann").predict(api_name="/state")


def test_signing_out_ends_the_session(app):
    url, service, _ = app
    bob = sign_in(url, "bob")
    bob.predict(api_name="/state")
    with httpx.Client(base_url=url, timeout=30, cookies=bob.cookies) as http:
        assert http.get("logout").status_code == 302
        assert http.get("config").status_code == 401
    with pytest.raises(Exception):
        bob.predict(api_name="/state")
    assert any(e["event"] == "sign_out" for e in service.store.auth_events("bob"))


def test_a_password_never_appears_in_logs_the_database_or_a_message(app, caplog):
    url, service, db = app
    messages = []
    with caplog.at_level(logging.DEBUG):
        sign_in(url, "ann").predict(api_name="/state")
        for name, password in (("ann", PASSWORDS["root"]), ("root", PASSWORDS["ann"]), (PASSWORDS["bob"], "x" * 9)):
            with pytest.raises(Exception) as caught:
                Client(url, auth=(name, password), verbose=False)
            messages.append(str(caught.value))
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post("login", data={"username": "ann", "password": PASSWORDS["bob"]})
            messages.append(answer.text)
    text = caplog.text + "\n".join(messages) + json.dumps(service.store.auth_events(limit=1000))
    assert "sign_in" in caplog.text  # the log was captured
    for password in PASSWORDS.values():
        assert password not in text
        assert password.encode() not in db_bytes(db)


def roles_app(tiny_loaded, tmp_path):
    db = tmp_path / "roles.db"
    make_accounts(db, names=("root", "ann"))
    return running_app(tiny_loaded, db, loop_settings={"adapters_dir": str(tmp_path / "adapters"),
                                                       "model_cache": str(tmp_path / "cache"),
                                                       "enabled": False},
                       extra_args=("--auth",))


def test_an_annotator_is_refused_admin_actions_an_admin_is_not(tiny_loaded, tmp_path):
    with roles_app(tiny_loaded, tmp_path) as (url, service, loop):
        ann, root = sign_in(url, "ann"), sign_in(url, "root")
        assert loop.paused is True  # the schedule starts off here: /resume is the change to refuse
        for endpoint, args in (("/train_now", ()), ("/pause", ()), ("/resume", ()), ("/rollback", ("v0",)),
                               ("/exclude_annotator", ("root", "")), ("/include_annotator", ("root", "")),
                               ("/train_without", ("root",))):
            refused(lambda: ann.predict(*args, api_name=endpoint), ADMIN_ONLY)
        assert loop.paused is True and loop.runs() == [] and loop.policy.snapshot().version == "v0"
        assert service.store.excluded_annotators() == [] and service.store.exclusion_log() == []
        refused_actions = {e["detail"] for e in service.store.auth_events("ann") if e["event"] == "refused"}
        assert {"admin action: train now", "admin action: pause", "admin action: rollback"} <= refused_actions
        # The panel's other controls are private events; called as the page calls them, they refuse too.
        settings = ["dpo", 0.2, 1e-4, 1, 0.1, "sigmoid", "base", None, 0.1, 1e-5, 2, 0.5]
        for api_name, data in (("apply_settings", settings), ("set_arena", [True]), ("set_best_of", [2]),
                               ("begin", ["concise", 1, 1, 0.0, 0, "marmalade"])):
            result = page_event(url, ann.cookies, api_name, data)
            assert result["success"] is False and result["output"]["error"] == ADMIN_ONLY, (api_name, result)
        assert loop.settings.include_arena is False and loop.next_config().get("beta") != 0.2
        assert page_event(url, root.cookies, "set_arena", [True])["success"] is True
        assert loop.settings.include_arena is True
        # The admin's settings reach the next round: the assumed misclicks with DPO's sigmoid loss, not with
        # IPO (it has no such term: sent, the round would refuse it).
        assert page_event(url, root.cookies, "apply_settings", settings)["success"] is True
        assert (loop.next_config()["beta"], loop.next_config()["label_smoothing"]) == (0.2, 0.1)
        assert loop.next_config()["edit_sft_weight"] == 0.5  # how much a typed better reply is imitated
        # An assumed share of misclicks of a half or more is refused with its reason, and changes nothing.
        for bad, reason in ((0.5, "greater than maximum value 0.49"), (-0.1, "less than minimum value 0")):
            refused_settings = page_event(url, root.cookies, "apply_settings", [*settings[:4], bad, *settings[5:]])
            assert refused_settings["success"] is False and reason in refused_settings["output"]["error"]
            assert loop.next_config()["label_smoothing"] == 0.1
        ipo = [*settings[:5], "ipo", *settings[6:]]
        assert page_event(url, root.cookies, "apply_settings", ipo)["success"] is True
        assert loop.next_config()["loss"] == "ipo" and "label_smoothing" not in loop.next_config()
        # Read-only endpoints stay open to a signed-in annotator.
        assert ann.predict(api_name="/training_status")["live"] == "v0"

        assert "Schedule running" in root.predict(api_name="/resume") and loop.paused is False
        assert "Schedule paused" in root.predict(api_name="/pause") and loop.paused is True
        assert "a round needs" in root.predict(api_name="/train_now")  # no votes yet: no round, but not refused
        assert "v0 is live" in root.predict("v0", api_name="/rollback")


def test_readme_client_example_with_auth_runs_against_the_live_app(app):
    url, service, _ = app
    block = (REPO / "README.md").read_text().split("<!-- client-example-auth -->", 1)[1]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    assert 'auth=("ann", "her password")' in code
    namespace = {}
    exec(code.replace("http://127.0.0.1:7860/", url).replace("her password", PASSWORDS["ann"]), namespace)  # noqa: S102
    conversation = namespace["pair"]["conversation_id"]
    assert service.store._rows("select c.user, f.value from feedback f join turns t on t.id = f.turn_id join "
                               "conversations c on c.id = t.conversation_id where c.id = ?",
                               [conversation]) == [{"user": "ann", "value": "a"}]


def test_the_autopilot_over_http_signs_in_and_votes_under_the_account(app, monkeypatch, capsys):
    from playground.sim.simulate import main as simulate

    url, service, _ = app
    argv = ["--url", url, "--users", "2", "--turns", "3", "--max-new-tokens", "8", "--auth-user", "bob"]
    monkeypatch.setenv("PLAYGROUND_PASSWORD", "wrong-password-1")
    assert simulate(argv) == 2
    assert "refused the sign-in of 'bob'" in capsys.readouterr().err
    monkeypatch.setenv("PLAYGROUND_PASSWORD", PASSWORDS["bob"])
    before = {c["id"] for c in service.store.conversations()}
    assert simulate(argv) == 0, capsys.readouterr().err
    made = [c for c in service.store.conversations() if c["id"] not in before]
    assert made and {(c["user"], c["simulated"]) for c in made} == {("bob", 1)}
    votes = service.store._rows("select f.user from feedback f join turns t on t.id = f.turn_id where "
                                f"t.conversation_id in ({','.join(str(c['id']) for c in made)})")
    assert len(votes) >= 3 and {v["user"] for v in votes} == {"bob"}
