"""Sign-in with `--auth`: who is calling, what an annotator may not do, and when a session ends.

Gradio's own login page checks a name and password with `Accounts` (the store's scrypt hashes) and sets
a session cookie; Gradio then refuses every route without one (the page, the API, the queue). Past that
door the app decides per call, from `gr.Request`:

- `admin_only(fn)` wraps a callback so it runs only when auth is off or the caller is an enabled admin;
  anyone else gets a `gr.Error` and the refusal is logged. The UI's buttons and the public API share the
  callbacks, so both are refused alike.
- `signed_in(fn)` wraps a callback whose first argument is the chat session: the session is bound to
  the account that first used it (its votes are recorded under that name), and a call from another
  account (a forged or replayed session id) is refused.

Whether auth is on is read from the server the request came through (`launch` gives Gradio an
`Accounts` as its `auth`), so a callback needs no flag of its own and the tests run what ships.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gradio as gr

if TYPE_CHECKING:
    from store import Store

AUTH_MESSAGE = ("Sign in with your RLHF Playground account. An admin creates accounts with "
                "<code>python -m store users add NAME --role annotator</code>.")
ADMIN_ONLY = "Only an admin can do this: you are signed in as an annotator."
NOT_SIGNED_IN = "You are not signed in (or your session expired): reload the page and sign in."
ACCOUNT_CLOSED = "Your account is disabled or no longer exists: ask an admin."
NOT_YOUR_SESSION = "This session belongs to another account: reload the page to start your own."
UNKNOWN_LOGIN = "This server's sign-in is not the playground's accounts: refused."
LOGOUT_PATH = "/logout"  # Gradio's route: it drops the cookie's session and returns to the login page

log = logging.getLogger("playground.auth")


class SessionTokens(dict):
    """Gradio's table of session cookies (token -> account name), with sign-in times: a token older than
    the session length, or whose account was disabled since, is gone. Gradio keeps no expiry of its own,
    so this replaces its plain dict, and every check Gradio makes (`get`, `in`, `[]`) sees such a token
    as absent: every route then answers as it does to someone who never signed in."""

    def __init__(self, session_s: float, clock: Callable[[], float] = time.time,
                 on_drop: Callable[[str, str, str | None], None] | None = None, active: Callable[[str], bool] | None = None):
        super().__init__()
        self.session_s = session_s
        self.clock = clock
        self.on_drop = on_drop or (lambda user, event, detail: None)
        self.active = active or (lambda user: True)
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def __setitem__(self, token: str, user: str) -> None:
        self.purge()  # each sign-in clears the expired ones, so the table holds only live sessions
        with self._lock:
            self._since[token] = self.clock()
            super().__setitem__(token, user)

    def _expire(self, token) -> None:
        with self._lock:
            since, user = self._since.get(token), super().get(token)
            if since is None or user is None:
                return
            event = "expired" if self.clock() - since >= self.session_s else None
        if event is None and not self._active(user):
            event = "refused"
        if event is None:
            return
        with self._lock:
            dropped = super().pop(token, None)
            self._since.pop(token, None)
        if dropped is not None:
            detail = "the account is disabled: its session ended" if event == "refused" else None
            self.on_drop(dropped, event, detail)

    def _active(self, user: str) -> bool:
        try:
            return self.active(user)
        except Exception as exc:  # a database that cannot be read now signs nobody out; calls still check
            log.warning("could not check whether %r is still enabled: %s", user, exc)
            return True

    def purge(self) -> None:
        for token in list(super().keys()):
            self._expire(token)

    def keys(self):  # Gradio's /logout walks the keys, then reads each: only live ones
        self.purge()
        return super().keys()

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        self.purge()
        return super().items()

    def get(self, token, default=None):
        self._expire(token)
        return super().get(token, default)

    def __getitem__(self, token):
        self._expire(token)
        return super().__getitem__(token)

    def __contains__(self, token) -> bool:
        self._expire(token)
        return super().__contains__(token)

    def __delitem__(self, token) -> None:  # Gradio's /logout
        with self._lock:
            user = super().pop(token)
            self._since.pop(token, None)
        self.on_drop(user, "sign_out", None)


class Accounts:
    """The app's door with `--auth`: Gradio calls it with what was typed on the login page. Each sign-in
    and each refusal is logged in the store (`auth_events`) and the app log, never with the password."""

    def __init__(self, store: "Store", session_hours: float, clock: Callable[[], float] = time.time):
        """`session_hours`: how long a sign-in lasts (app.py's --session-hours); `clock`: seconds, for the tests."""
        if not session_hours > 0:
            raise ValueError(f"session hours {session_hours} must be above 0")
        self.store = store
        self.session_hours = session_hours
        self.tokens = SessionTokens(session_hours * 3600.0, clock, on_drop=self.record,
                                    active=lambda user: store.role(user) is not None)

    def __call__(self, username: str, password: str) -> bool:
        role = self.store.verify(username, password)
        if role is None:
            # The person sees one answer for all three. The log names an account only if it exists: what
            # was typed as a name that is none is often the password, typed in the wrong box.
            known = isinstance(username, str) and self.store.user(username) is not None
            self.record(username if known else None, "sign_in_refused",
                        "wrong password, or the account is disabled" if known else "no account by the name typed")
            return False
        self.record(username, "sign_in", f"role {role}")
        return True

    def install(self, app) -> None:
        """Put the expiring token table in the running Gradio app (it makes a plain dict at launch). A
        sign-in that landed in Gradio's dict in the moment since the server started is carried over."""
        for token, user in dict(app.tokens).items():
            self.tokens[token] = user
        app.tokens = self.tokens

    def role(self, username: str | None) -> str | None:
        """The role of an enabled account (read each call: disabling an account takes effect at once)."""
        return None if username is None else self.store.role(username)

    def record(self, user: str | None, event: str, detail: str | None = None) -> None:
        log.info("auth %s: %s%s", event, user, f" ({detail})" if detail else "")
        try:
            self.store.log_auth_event(user, event, detail)
        except Exception as exc:  # a full or locked disk must not turn a refusal into an acceptance
            log.warning("the sign-in log was not written: %s", exc)

    def refuse(self, user: str | None, what: str, message: str) -> None:
        self.record(user, "refused", what)
        raise gr.Error(message)

    def caller(self, request: gr.Request | None, what: str) -> str:
        """The signed-in, still enabled account making this call; refused (gr.Error) otherwise."""
        user = getattr(request, "username", None)
        if user is None:
            self.refuse(None, what, NOT_SIGNED_IN)
        if self.role(user) is None:
            self.refuse(user, what, ACCOUNT_CLOSED)
        return user


def accounts_of(request: gr.Request | None) -> Accounts | None:
    """The `Accounts` of the server this request came through; None when it runs without auth."""
    app = getattr(getattr(request, "request", None), "app", None)
    auth = getattr(app, "auth", None)
    if isinstance(auth, Accounts):
        return auth
    if auth is not None or (request is not None and getattr(request, "username", None) is not None):
        # Some other login in front of the app: no account or role is known here, so nothing is allowed.
        raise gr.Error(UNKNOWN_LOGIN)
    return None


def user_of(request: gr.Request | None) -> str | None:
    """The signed-in account's name; None without auth."""
    accounts = accounts_of(request)
    return None if accounts is None else accounts.caller(request, "a call")


def is_admin(request: gr.Request | None) -> bool:
    """Without auth the one local user is the admin."""
    accounts = accounts_of(request)
    return accounts is None or accounts.role(getattr(request, "username", None)) == "admin"


def require_admin(request: gr.Request | None, action: str) -> None:
    accounts = accounts_of(request)
    if accounts is None:
        return
    user = accounts.caller(request, action)
    if accounts.role(user) != "admin":
        accounts.refuse(user, f"admin action: {action}", ADMIN_ONLY)


def bind_session(state: Any, request: gr.Request | None, action: str) -> None:
    """With auth: the session belongs to the account that first used it, and is recorded under its name.
    Without: nothing changes (one local user, `anonymous` unless they say otherwise)."""
    accounts = accounts_of(request)
    if accounts is None:
        return
    user = accounts.caller(request, action)
    with getattr(state, "lock", None) or contextlib.nullcontext():  # two first calls at once: one owner
        owner = getattr(state, "owner", None)
        if owner is None:
            state.owner = owner = user
            state.user = user
    if owner != user:
        accounts.refuse(user, f"{action} on a session of {owner!r}", NOT_YOUR_SESSION)


def claim_name(state: Any, name: str | None, request: gr.Request | None) -> str | None:
    """The name a new conversation is recorded under. Without auth, whatever the caller says (the one local
    user, or a script naming its simulated annotators). With auth, only the caller's own account: naming
    another would record votes under someone else's name."""
    accounts = accounts_of(request)
    if accounts is None:
        return name
    bind_session(state, request, "new conversation")
    if name is not None and name.strip() != state.owner:
        accounts.refuse(state.owner, f"new conversation as {name.strip()[:80]!r}",
                        f"You are signed in as {state.owner!r}: your votes are recorded under that name only.")
    return state.owner


def admin_only(fn: Callable, action: str | None = None) -> Callable:
    """`fn` as a Gradio callback that runs only for an admin (or when auth is off); others get gr.Error.

        button.click(admin_only(loop.train_now, "train now"), None, note, api_name="train_now")
    """
    action = action or getattr(fn, "__name__", "an admin action").strip("<>")
    return _with_request(fn, lambda request, args: require_admin(request, action))


def signed_in(fn: Callable, action: str | None = None) -> Callable:
    """`fn(state, ...)` as a Gradio callback whose session is bound to the calling account (bind_session)."""
    action = action or getattr(fn, "__name__", "a call").strip("<>")
    return _with_request(fn, lambda request, args: bind_session(args[0], request, action))


def _with_request(fn: Callable, check: Callable[[gr.Request | None, tuple], None]) -> Callable:
    """`fn` with a `gr.Request` first parameter that Gradio fills; `check` runs before `fn`. The signature
    (and so the API's parameter names and defaults) is `fn`'s, and a generator stays a generator (Gradio
    streams only what it sees is one)."""
    if inspect.isgeneratorfunction(fn):
        def wrapper(request: gr.Request, *args):
            check(request, args)
            yield from fn(*args)
    else:
        def wrapper(request: gr.Request, *args):
            check(request, args)
            return fn(*args)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except ValueError:
        params = []
    request_param = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
    wrapper.__signature__ = inspect.Signature([request_param, *params])
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # names only imported for type checking: Gradio needs just the request's
        hints = {}
    wrapper.__annotations__ = {**hints, "request": gr.Request}
    wrapper.__name__ = getattr(fn, "__name__", "callback")
    wrapper.__doc__ = fn.__doc__
    return wrapper
