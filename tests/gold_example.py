"""User gold functions for tests/test_gold.py's `module:function` path (and a template for writing one).

A gold takes (context, reply) and returns a finite number, higher = preferred.
"""

from __future__ import annotations

NOT_A_FUNCTION = 42


def mentions_user_words(context, reply):
    """The fraction of the user's last message's words that the reply repeats (a crude 'stays on topic')."""
    user = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
    words = {w.lower().strip(".,!?") for w in user.split()} - {""}
    if not words:
        return 0.0
    said = {w.lower().strip(".,!?") for w in reply.split()}
    return len(words & said) / len(words)


def returns_text(context, reply):
    return "good"


def returns_nan(context, reply):
    return float("nan")


def returns_inf(context, reply):
    return float("inf")


def fails_on_empty(context, reply):
    return 1.0 / len(reply)


class Scorers:
    @staticmethod
    def length(context, reply):
        return len(reply)


def characters(context, reply):
    """The reply's length in characters, with a fraction from its code points: two different replies all
    but never score the same, so every vote is a preference (the concise gold counts words, and the tiny
    model's 8-token replies often have as many words as each other: a tie, no training pair)."""
    return len(reply) + (sum(map(ord, reply)) % 997) / 1000
