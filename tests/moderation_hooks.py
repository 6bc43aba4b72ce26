"""Moderation hooks for the tests, loaded as the app loads any: --moderation tests.moderation_hooks:NAME."""

from __future__ import annotations

NOT_A_FUNCTION = 42


def strict(text: str, role: str) -> str | None:
    """Refuses messages about "forbidden" things and every reply."""
    if role == "user":
        return "it mentions the forbidden topic" if "forbidden" in text.lower() else None
    return "replies are withheld on this test server"


def broken(text: str, role: str) -> str | None:
    raise RuntimeError("the policy service is down")


def unsure(text: str, role: str):
    return True  # neither None nor a reason
