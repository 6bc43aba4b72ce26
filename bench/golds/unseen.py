"""The taste the label-efficiency sweep never saw (issue 14): written after the sweep's settings were
fixed, and scored only once the defaults were chosen, so it tells whether they hold on a new taste.

    python -m bench.loop --gold bench.golds.unseen:plain_words --tau 0.3 ...

`plain_words` is a reader who wants plain language: short everyday words rather than long ones. It is
none of the shipped golds: not length (`concise` counts words, this measures them: a long reply of short
words scores well), not a keyword, a mood or a layout. Measured on 64 of bench.loop's v0 pairs (bundled
SmolLM2-135M-Instruct, 96 tokens, temperature 1, 2026-12-01): words of 4.67 letters on average (sd 0.82
across replies), and the two replies of a pair 0.44 apart at the median (quartiles 0.21 and 0.69). So
--tau 0.3: a gap of 0.3 is a 73% preference, the median pair about 81%.
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
