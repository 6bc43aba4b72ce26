"""Which two of several sampled replies to show for judgment.

A label teaches most where the current policy is unsure (active preference learning; the seeds'
open-problems paper, on which comparisons to ask people for). With K candidates per prompt:

- `random`: the first two (the candidates are already random samples): the plain loop;
- `least_separated`: the two whose implicit rewards under the current policy are closest. DPO's
  implicit reward of a reply is beta * (log pi(reply) - log pi_ref(reply)); the pair it cannot yet tell
  apart is the one whose label moves its loss most. Under v0 every reward is 0: the first two, as random;
- `most_different`: the two whose words overlap least (Jaccard distance of their word sets), so the
  judge compares two real alternatives rather than two near copies.

Ties go to the lower indices, so a choice is reproducible from its inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

PAIR_RULES = ("random", "least_separated", "most_different")
WORD = re.compile(r"\w+")


def least_separated(rewards: Sequence[float]) -> tuple[int, int]:
    """The indices (i < j) of the two rewards closest to each other."""
    _check(len(rewards))
    return min(combinations(range(len(rewards)), 2), key=lambda ij: (abs(rewards[ij[0]] - rewards[ij[1]]), ij))


def word_distance(a: str, b: str) -> float:
    """1 - Jaccard similarity of the two texts' lower-cased word sets (0: the same words, 1: none shared)."""
    wa, wb = set(WORD.findall(a.lower())), set(WORD.findall(b.lower()))
    if not wa and not wb:
        return 0.0
    return 1.0 - len(wa & wb) / len(wa | wb)


def most_different(texts: Sequence[str]) -> tuple[int, int]:
    """The indices (i < j) of the two texts that share the fewest words."""
    _check(len(texts))
    return min(combinations(range(len(texts)), 2), key=lambda ij: (-word_distance(texts[ij[0]], texts[ij[1]]), ij))


def choose_pair(rule: str, texts: Sequence[str], rewards: Sequence[float] | None = None) -> tuple[int, int]:
    """The pair `rule` picks among the candidates (`rewards`: their implicit rewards, for least_separated)."""
    if rule not in PAIR_RULES:
        raise ValueError(f"unknown pair rule {rule!r}; one of {', '.join(PAIR_RULES)}")
    _check(len(texts))
    if rule == "random":
        return 0, 1
    if rule == "most_different":
        return most_different(texts)
    if rewards is None or len(rewards) != len(texts):
        raise ValueError("least_separated needs one implicit reward per candidate")
    return least_separated(rewards)


def _check(n: int) -> None:
    if n < 2:
        raise ValueError(f"a pair needs at least 2 candidates, got {n}")
