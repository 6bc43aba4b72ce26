"""Accounts: names, roles and passwords kept as scrypt hashes, and the sign-in log. A mixin of `Store`.

A password is hashed with the standard library's `hashlib.scrypt` (a random salt per account, the cost
parameters stored in the hash string so they can be raised later without breaking old accounts) and is
never stored, logged or put in an error message. A disabled account keeps its row, so its votes keep
their name, but can no longer sign in.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from typing import Any

ROLES = ("annotator", "admin")
MAX_NAME_CHARS = 64
MIN_PASSWORD_CHARS = 8
# scrypt's cost does not grow with the length, but a megabyte-long "password" is not one.
MAX_PASSWORD_CHARS = 1024
# scrypt's cost: one of the settings OWASP's password storage cheat sheet lists (N=2^14, r=8, p=5): 16 MiB
# a check, so several sign-ins at once stay small, with p=5 buying the time a larger N would.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 5
SALT_BYTES = 16
KEY_BYTES = 32
HASH_SCHEME = "scrypt"
# Room for the largest cost the hash strings may name (128 * N * r bytes, plus slack).
SCRYPT_MAXMEM = 64 * 1024 * 1024
# What a sign-in log row may say: the events the app writes.
AUTH_EVENTS = ("sign_in", "sign_in_refused", "sign_out", "refused", "expired", "user_added", "user_disabled",
               "user_enabled")
MAX_DETAIL_CHARS = 500


class AccountError(ValueError):
    """An account that cannot be made or changed as asked (bad name, unknown role...). Its message never
    contains a password."""


def check_name(name: str) -> str:
    """The account name as stored, or AccountError saying what is wrong with it."""
    if not isinstance(name, str) or not name or name != name.strip():
        # The login page strips what is typed: a name with spaces around it could never sign in.
        raise AccountError("An account name must not be empty or start or end with spaces.")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise AccountError(f"An account name must be 1 to {MAX_NAME_CHARS} printable characters.")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"Unknown role {role!r}: one of {', '.join(ROLES)}.")
    return role


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AccountError(f"A password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters.")
    return password


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_password(password: str) -> str:
    """'scrypt$N$r$p$salt$key' (base64): everything a later check needs, nothing that reveals the password."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         maxmem=SCRYPT_MAXMEM, dklen=KEY_BYTES)
    return f"{HASH_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != HASH_SCHEME:
            return False
        expected = base64.b64decode(key)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@functools.lru_cache(maxsize=1)
def _decoy_hash() -> str:
    # Checked against when the name is unknown, so a wrong name costs as long as a wrong password: how
    # long a refusal takes does not tell which names exist.
    return hash_password(secrets.token_urlsafe(16))


class AccountQueries:
    # -- accounts ---------------------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str) -> dict[str, Any]:
        """A new account (AccountError if the name is taken or anything is malformed); returns it, hash omitted."""
        name, role, password = check_name(name), check_role(role), check_password(password)
        if self.user(name) is not None:
            raise AccountError(f"There is already an account named {name!r}.")
        with self._write("the account") as db:
            db["users"].insert({"name": name, "role": role, "password_hash": hash_password(password), "disabled": 0,
                                "created_at": self._now()})
            db["auth_events"].insert({"user": name, "event": "user_added", "detail": f"role {role}",
                                      "created_at": self._now()})
        return self.user(name)

    def user(self, name: str) -> dict[str, Any] | None:
        """One account without its hash: name, role, disabled, created_at, disabled_at."""
        rows = self._rows("select name, role, disabled, created_at, disabled_at from users where name = ?", [name])
        return rows[0] if rows else None

    def users(self) -> list[dict[str, Any]]:
        """Every account, oldest first, without the hashes."""
        return self._rows("select name, role, disabled, created_at, disabled_at from users order by id")

    def disable_user(self, name: str) -> None:
        self._set_disabled(name, True)

    def enable_user(self, name: str) -> None:
        self._set_disabled(name, False)

    def _set_disabled(self, name: str, disabled: bool) -> None:
        if self.user(name) is None:
            raise AccountError(f"There is no account named {name!r}.")
        with self._write("the account") as db:
            db.execute("update users set disabled = ?, disabled_at = ? where name = ?",
                       [int(disabled), self._now() if disabled else None, name])
            db["auth_events"].insert({"user": name, "event": "user_disabled" if disabled else "user_enabled",
                                      "detail": None, "created_at": self._now()})

    def verify(self, name: str, password: str) -> str | None:
        """The account's role if `password` is its password and it is enabled; None otherwise."""
        rows = self._rows("select role, password_hash, disabled from users where name = ?", [name]) \
            if isinstance(name, str) else []
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return None
        if not rows:
            password_matches(password, _decoy_hash())
            return None
        row = rows[0]
        return row["role"] if password_matches(password, row["password_hash"]) and not row["disabled"] else None

    def role(self, name: str) -> str | None:
        """The role of an enabled account; None for an unknown or disabled one."""
        rows = self._rows("select role from users where name = ? and disabled = 0", [name])
        return rows[0]["role"] if rows else None

    def has_admin(self) -> bool:
        return bool(self._rows("select 1 from users where role = 'admin' and disabled = 0 limit 1"))

    # -- the sign-in log --------------------------------------------------------------------------

    def log_auth_event(self, user: str | None, event: str, detail: str | None = None) -> None:
        """One row of the sign-in log. `detail` says what was refused or why; never pass a password."""
        if event not in AUTH_EVENTS:
            raise AccountError(f"Unknown sign-in event {event!r}: one of {', '.join(AUTH_EVENTS)}.")
        user = None if user is None else str(user)[:MAX_NAME_CHARS * 2]
        detail = None if detail is None else str(detail)[:MAX_DETAIL_CHARS]
        with self._write("the sign-in log") as db:
            db["auth_events"].insert({"user": user, "event": event, "detail": detail, "created_at": self._now()})

    def auth_events(self, user: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest sign-in log rows first, optionally one account's."""
        if user is None:
            return self._rows("select * from auth_events order by id desc limit ?", [int(limit)])
        return self._rows("select * from auth_events where user = ? order by id desc limit ?", [user, int(limit)])
