"""Per-annotator health from the store's raw counts: side bias, tie habits, agreement, with intervals.

The store counts (`store.annotators.annotator_counts`: what "the same pair" means is said there); this
turns the counts into shares, each with its n and a 95% Wilson interval, so a reader can tell a biased
annotator from a small sample. A share with nothing to count is None (and its interval too).
"""

from __future__ import annotations

from playground.metrics.intervals import wilson


def annotator_share(successes: float, n: int) -> dict:
    """{rate, lo, hi, n}: successes / n with its Wilson interval; rate, lo and hi None when n is 0."""
    if not n:
        return {"rate": None, "lo": None, "hi": None, "n": 0}
    lo, hi = wilson(successes, n)
    return {"rate": successes / n, "lo": lo, "hi": hi, "n": int(n)}


def annotator_summary(counts: dict) -> dict:
    """One annotator's raw counts (votes, a, b, tie, both_bad, agree, n_agreement, majority_match,
    n_majority) as shares: {left: share of A among the A/B choices (position bias: 0.5 is none), tie,
    both_bad (of all votes), agreement (of the vote pairs with another annotator on the same item),
    majority (of the votes on items where the others have a majority)}, each a `annotator_share` dict."""
    decided = counts["a"] + counts["b"]
    return {
        "left": annotator_share(counts["a"], decided),
        "tie": annotator_share(counts["tie"], counts["votes"]),
        "both_bad": annotator_share(counts["both_bad"], counts["votes"]),
        "agreement": annotator_share(counts["agree"], counts["n_agreement"]),
        "majority": annotator_share(counts["majority_match"], counts["n_majority"]),
    }
