"""The taste the label-efficiency sweep never saw (issue 14): written after the sweep's settings were
fixed, and scored only once the defaults were chosen, so it tells whether they hold on a new taste.

    python -m bench.loop --gold bench.golds.unseen:plain_words --tau 0.3 ...

`plain_words` is a reader who wants plain language: short everyday words rather than long ones. It is
none of the shipped golds: not length (`concise` counts words, this measures them: a long reply of short
words scores well), not a keyword, a mood or a layout. SmolLM2-135M-Instruct writes words of about 4.6
letters on average, and two replies to one prompt differ by a few tenths: --tau 0.3 makes a gap of 0.3
a 73% preference.
"""

from __future__ import annotations

import re

WORD = re.compile(r"[A-Za-z]+")
# A reply without a single word is no plain-language answer: worse than any reply with words (whose
# score is minus their mean length, about -3 to -8), so the taste never rewards saying nothing.
NO_WORDS_SCORE = -20.0


def plain_words(context, reply: str) -> float:
    """Minus the mean length, in letters, of the reply's words (higher: plainer)."""
    words = WORD.findall(reply)
    if not words:
        return NO_WORDS_SCORE
    return -sum(len(w) for w in words) / len(words)
