"""Which two of several sampled replies to show for judgment.

A label teaches most where the current policy is unsure (active preference learning; the seeds'
open-problems paper, on which comparisons to ask people for). With K candidates per prompt:

- `random`: the first two (the candidates are already random samples): the plain loop;
- `least_separated`: the two whose implicit rewards under the current policy are closest. DPO's
  implicit reward of a reply is beta * (log pi(reply) - log pi_ref(reply)); the pair it cannot yet tell
  apart is the one whose label moves its loss most. Under v0 every reward is 0: the first two, as random;
- `most_different`: the two whose words overlap least (Jaccard distance of their word sets), so the
  judge compares two real alternatives rather than two near copies;
- `least_tie`: the two a tie model learned from this judge's earlier votes rates least likely to be
  called a tie. A taste that cares about one thing (a word, a list) ties most pairs: neither reply has
  it. Its ties and non-ties say which differences it notices, without saying what the taste is: a
  logistic regression on the differences between two replies (the words and shapes only one of them
  has, `pair_features`) learns, from one round of votes, that a pair differing in "here" or in being a
  list is the one that gets judged. Before there are both ties and non-ties to learn from, the first
  two, as random.

Ties go to the lower indices, so a choice is reproducible from its inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from itertools import combinations

PAIR_RULES = ("random", "least_separated", "most_different", "least_tie")
WORD = re.compile(r"\w+")
LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
# The tie model's L2 penalty on its weights (on the mean log loss): a round's 64 votes against a few
# thousand word features would otherwise fit each vote by its own rare words. At 0.01 it picked "here"
# and "<list>" as the top features from 48 votes of keyword:word=here and format (bench/pair_ties.py).
TIE_MODEL_L2 = 0.01
TIE_MODEL_STEPS = 200  # L-BFGS iterations; a few hundred votes converge well within them
# The model is fit on the judge's latest votes only: its features are dense in memory (votes x distinct
# words), and a taste's ties are best told by the replies the policy writes now.
TIE_MODEL_MAX_VOTES = 512
LENGTH_BUCKET_WORDS = 15  # reply length is a feature in steps of this many words
MAX_BUCKET = 6


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


def reply_features(text: str) -> frozenset[str]:
    """What a judge might notice in one reply: its lower-cased words, and its shape as tokens in <>
    (a list line, a question, its number of lines and its length, both bucketed)."""
    lines = [line for line in text.splitlines() if line.strip()]
    shape = {f"<lines:{min(len(lines), MAX_BUCKET)}>",
             f"<words:{min(len(WORD.findall(text)) // LENGTH_BUCKET_WORDS, MAX_BUCKET)}>"}
    if any(LIST_LINE.match(line) for line in lines):
        shape.add("<list>")
    if "?" in text:
        shape.add("<question>")
    return frozenset(WORD.findall(text.lower())) | shape


def pair_features(a: str, b: str) -> frozenset[str]:
    """The features only one of the two replies has: what could make a judge prefer one (order-free)."""
    return reply_features(a) ^ reply_features(b)


class TieModel:
    """P(a judge calls a pair a tie), from the features that differ between its replies: an L2-regularised
    logistic regression fit on the latest TIE_MODEL_MAX_VOTES (reply a, reply b, tied) votes. `fit`
    returns None where those hold only ties or only non-ties: nothing to tell apart yet."""

    def __init__(self, weights: dict[str, float], bias: float):
        self.weights, self.bias = weights, bias

    @classmethod
    def fit(cls, votes: Sequence[tuple[str, str, bool]]) -> TieModel | None:
        import torch

        votes = list(votes)[-TIE_MODEL_MAX_VOTES:]
        tied = [bool(t) for _, _, t in votes]
        if all(tied) or not any(tied):
            return None
        rows = [pair_features(a, b) for a, b, _ in votes]
        vocab = sorted(set().union(*rows))
        index = {name: i for i, name in enumerate(vocab)}
        x = torch.zeros(len(rows), len(vocab), dtype=torch.float64)
        for r, features in enumerate(rows):
            x[r, [index[f] for f in features]] = 1.0
        y = torch.tensor([0.0 if t else 1.0 for t in tied], dtype=torch.float64)  # 1: judged, not a tie
        w = torch.zeros(len(vocab), dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=TIE_MODEL_STEPS, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + TIE_MODEL_L2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls({name: float(v) for name, v in zip(vocab, w.detach()) if v != 0.0}, float(b.detach()))

    def top(self, count: int = 5) -> list[str]:
        """The features weighed most toward "judged", highest first (ties by name)."""
        return sorted(self.weights, key=lambda f: (-self.weights[f], f))[:count]

    def p_tie(self, a: str, b: str) -> float:
        logit = self.bias + sum(self.weights.get(f, 0.0) for f in pair_features(a, b))
        return 1.0 / (1.0 + math.exp(min(logit, 700.0)))  # logit is of "judged": P(tie) = sigmoid(-logit)


def least_tie(texts: Sequence[str], model: TieModel | None) -> tuple[int, int]:
    """The indices (i < j) of the two texts `model` rates least likely to tie; the first two without one."""
    _check(len(texts))
    if model is None:
        return 0, 1
    return min(combinations(range(len(texts)), 2), key=lambda ij: (model.p_tie(texts[ij[0]], texts[ij[1]]), ij))


def choose_pair(rule: str, texts: Sequence[str], rewards: Sequence[float] | None = None,
                tie_model: TieModel | None = None) -> tuple[int, int]:
    """The pair `rule` picks among the candidates (`rewards`: their implicit rewards, for least_separated;
    `tie_model`: the judge's tie model so far, for least_tie)."""
    if rule not in PAIR_RULES:
        raise ValueError(f"unknown pair rule {rule!r}; one of {', '.join(PAIR_RULES)}")
    _check(len(texts))
    if rule == "random":
        return 0, 1
    if rule == "most_different":
        return most_different(texts)
    if rule == "least_tie":
        return least_tie(texts, tie_model)
    if rewards is None or len(rewards) != len(texts):
        raise ValueError("least_separated needs one implicit reward per candidate")
    return least_separated(rewards)


def _check(n: int) -> None:
    if n < 2:
        raise ValueError(f"a pair needs at least 2 candidates, got {n}")
