"""Cheap text statistics of replies and votes: diversity, length, and the length bias of voters.

Tokens here are the lower-cased whitespace split of a text, not the model's tokenizer: these metrics
compare versions of the same model with each other, so a simple, tokenizer-free unit is enough and
keeps the module free of model code. Lengths in `length_summary` and `length_bias` are whatever the
caller counted (the app passes reply tokens).
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from playground.metrics._arrays import as_matrix, unit_rows
from playground.metrics.intervals import wilson

# The finish reasons the serving engine reports: hit max_new_tokens, or emitted end-of-sequence.
FINISH_LENGTH = "length"
FINISH_STOP = "stop"


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (Li et al. 2016's distinct-n).

    n-grams never span two texts. 0.0 when no text has n tokens. A falling distinct-n across versions
    is the usual first sign of mode collapse under preference training.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        toks = _tokens(text)
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean_pairwise_similarity(embeddings: Any) -> float | None:
    """Mean cosine similarity over all pairs i < j of a [k, d] array or tensor; None when k < 2.

    Replies to one prompt that all embed alike mean the policy has stopped exploring.
    """
    arr = as_matrix(embeddings)
    k = arr.shape[0]
    if k < 2:
        return None
    unit = unit_rows(arr)
    sims = unit @ unit.T
    i, j = np.triu_indices(k, 1)
    return float(sims[i, j].mean())


def length_summary(n_tokens: list[int], finish_reasons: list[str]) -> dict:
    """{"mean", "median", "limit_share", "stop_share", "n"} of reply lengths.

    limit_share is the share cut off by the token limit (finish "length"): a rising share means the
    policy is learning that longer wins and the limit is hiding how long it wants to go.
    No replies gives None for every share and average.
    """
    if len(n_tokens) != len(finish_reasons):
        raise ValueError(f"{len(n_tokens)} lengths but {len(finish_reasons)} finish reasons")
    n = len(n_tokens)
    if n == 0:
        return {"mean": None, "median": None, "limit_share": None, "stop_share": None, "n": 0}
    return {
        "mean": float(statistics.fmean(n_tokens)),
        "median": float(statistics.median(n_tokens)),
        "limit_share": sum(f == FINISH_LENGTH for f in finish_reasons) / n,
        "stop_share": sum(f == FINISH_STOP for f in finish_reasons) / n,
        "n": n,
    }


def length_bias(pairs: list[tuple[int, int]]) -> dict:
    """How often the longer reply won: {"longer_won", "lo", "hi", "n"}.

    pairs are (tokens of the chosen reply, tokens of the rejected reply). Equal lengths say nothing
    about length and are left out, so n counts unequal pairs only. With no such pair longer_won, lo
    and hi are None. 0.5 inside the Wilson interval means no detectable bias.
    """
    unequal = [(c, r) for c, r in pairs if c != r]
    n = len(unequal)
    if n == 0:
        return {"longer_won": None, "lo": None, "hi": None, "n": 0}
    longer = sum(c > r for c, r in unequal)
    lo, hi = wilson(longer, n)
    return {"longer_won": longer / n, "lo": lo, "hi": hi, "n": n}


def identical_share(pairs: list[tuple[str, str]]) -> dict:
    """Share of pairs whose two replies are the same string: {"share", "n_identical", "n"}.

    Compared exactly as given (callers strip if they want to). Identical pairs teach DPO nothing and
    grow as sampling collapses. No pairs gives share None.
    """
    n = len(pairs)
    same = sum(a == b for a, b in pairs)
    return {"share": same / n if n else None, "n_identical": same, "n": n}
