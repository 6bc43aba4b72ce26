"""The moderation hook: a function that may refuse a person's message before anything is generated for
it, and a reply before anyone sees it.

    python app.py --moderation playground.moderation:word_list
    python app.py --moderation mypackage.policy:check      # any importable module:function

The protocol, for a hook's author:

    def check(text: str, role: str) -> str | None

- `role` is "user" for a person's text: a message (called once per send, before generation) or a
  better reply they wrote (before it is saved: it becomes the chosen side of training pairs); and
  "assistant" for one reply (called once per reply when it is finished, before it is shown; a pair's two replies are
  checked one after the other, A first).
- Return None to allow the text, or a non-empty string to refuse it: the string is the reason, shown to
  the person and stored with the turn (`turns.moderation_json`), so write it for them ("it contains a
  phone number"), and keep it short (it is cut at MAX_REASON_CHARS).
- Anything else returned (True, "", 0) is a broken hook, handled like an exception: see below.
- It is called from several threads at once and must be thread-safe; it runs while the person waits,
  so it should be quick. The app calls it once at start with ("hello", "user") to check that it loads
  and runs; that call's answer is not used.

What a refusal does:
- A refused message is stored as a turn with no replies and its refusal, nothing is generated, the
  person is told why, and the message box keeps what they typed.
- A refused better reply is not saved (the refusal is recorded on the turn); the pair can still be voted on.
- A refused reply is stored (for the audit) but never shown: its panel says it was withheld and why.
  A pair with a withheld reply cannot be judged (no vote, thumb or better reply), so it produces no
  training pair; Regenerate gives a new pair. Its other reply, if allowed, is what the conversation
  goes on from; with both withheld the turn leaves the conversation the model reads.
- While a hook other than `allow_all` is on, replies are not streamed as they are written: a reply is
  shown only once it is finished and allowed (the panels show its token count meanwhile).

Shipped hooks: `allow_all` (the default, a no-op) and `word_list` (refuses text containing a listed word
or phrase; see its docstring).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ROLES = ("user", "assistant")
DEFAULT_HOOK = "playground.moderation:allow_all"
# The word list `word_list` reads unless MODERATION_WORDS_FILE names another file.
WORDS_FILE_ENV = "MODERATION_WORDS_FILE"
DEFAULT_WORDS_FILE = Path(__file__).with_name("moderation_words.txt")
# A reason longer than this is cut: it is shown in a one-line notice and stored with every refusal.
MAX_REASON_CHARS = 300
# What a person is told when the hook itself failed (raised, or answered outside the protocol).
HOOK_FAILED_REASON = "the moderation check failed, so nothing was let through; try again, or tell the admin"
SMOKE_TEXT = "hello"

Hook = Callable[[str, str], "str | None"]


class ModerationHookError(RuntimeError):
    """The --moderation hook cannot be used (bad spec, import error, not callable, fails when called)."""


def allow_all(text: str, role: str) -> str | None:
    """The default hook: allows everything."""
    return None


def word_list(text: str, role: str) -> str | None:
    """Refuse text that contains a listed word or phrase (whole words, case-insensitive).

    The list is the file named by the environment variable MODERATION_WORDS_FILE, else
    playground/moderation_words.txt next to this module: one word or phrase a line, `#` starts a comment.
    A file rather than the variable itself so the list can be long, versioned and edited without quoting;
    it is read again when its modification time changes, so edits apply without a restart. A missing
    or unreadable file is an error (the app refuses to start; later, every text is refused), never an
    empty list that silently allows everything."""
    path = Path(os.environ.get(WORDS_FILE_ENV) or DEFAULT_WORDS_FILE)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise ModerationHookError(f"the word list {path} cannot be read ({exc.strerror})") from exc
    match = _word_pattern(str(path), stamp).search(text)
    if match is None:
        return None
    listed = " ".join(match.group(0).lower().split())  # as listed, not as typed
    return f"it contains \u201c{listed}\u201d, which is on the word list"


@functools.lru_cache(maxsize=4)
def _word_pattern(path: str, stamp: int) -> re.Pattern:
    """The word list as one regex; cached per (file, modification time)."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            words.append(r"\s+".join(re.escape(part) for part in word.split()))
    if not words:
        return re.compile(r"(?!x)x")  # an empty list (all comments) allows everything, as written
    # Longest first, so "credit card number" is named rather than a shorter entry inside it.
    words.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?!\w)", re.IGNORECASE)


class Moderator:
    """A loaded hook, called by the chat service: the protocol's checks and the failure policy in one place."""

    def __init__(self, hook: Hook, name: str = DEFAULT_HOOK):
        self.hook, self.name = hook, name

    @property
    def active(self) -> bool:
        """Whether there is anything to check: the default no-op needs no call and holds no reply back."""
        return self.hook is not allow_all

    def check(self, text: str, role: str) -> tuple[str | None, bool]:
        """(reason, failed): reason None allows the text; `failed` says the hook itself broke."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {ROLES}")
        try:
            answer = self.hook(text, role)
        except Exception:
            # Fail closed: a team turns the hook on because some text must not pass, and a check that
            # is down must not quietly become "everything passes". The cost is loud (the person is told,
            # the log has the traceback); failing open would cost silently.
            log.exception("the moderation hook %s raised on a %s text; refusing it", self.name, role)
            return HOOK_FAILED_REASON, True
        if answer is None:
            return None, False
        if not isinstance(answer, str) or not answer.strip():
            log.error("the moderation hook %s returned %r for a %s text, neither None nor a reason; refusing it",
                      self.name, answer, role)
            return HOOK_FAILED_REASON, True
        reason = " ".join(answer.split())
        return (reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "\u2026"), False


def load_hook(spec: str) -> Moderator:
    """Import `module:function` and check it answers once; ModerationHookError says what is wrong."""
    module_name, sep, attr = (spec or "").strip().partition(":")
    if not sep or not module_name or not attr:
        raise ModerationHookError(f"--moderation {spec!r} is not module:function (e.g. {DEFAULT_HOOK})")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while it loads
        raise ModerationHookError(f"--moderation {spec}: cannot import {module_name} "
                                  f"({type(exc).__name__}: {exc})") from exc
    hook = module
    for part in attr.split("."):
        if not hasattr(hook, part):
            raise ModerationHookError(f"--moderation {spec}: {module_name} has no {attr}")
        hook = getattr(hook, part)
    if not callable(hook):
        raise ModerationHookError(f"--moderation {spec}: {attr} is a {type(hook).__name__}, not a function")
    try:
        answer = hook(SMOKE_TEXT, "user")
    except Exception as exc:
        raise ModerationHookError(f"--moderation {spec} failed on a test message ({type(exc).__name__}: "
                                  f"{exc})") from exc
    if answer is not None and not (isinstance(answer, str) and answer.strip()):
        raise ModerationHookError(f"--moderation {spec} returned {answer!r} for a test message; a hook returns "
                                  "None (allowed) or a non-empty reason")
    return Moderator(hook, spec.strip())
