"""Confidence intervals for the numbers on the dashboard: a win rate, a mean, any statistic, a paired change.

Every number shown carries its n and an interval so a reader can tell a change from chance. A change
between two policies measured on the same prompts is a paired difference (`paired_bootstrap`), and
`labels_to_significance` reads the first round of a loop whose interval of it lies above zero. scipy is
not a dependency, so the Student t quantiles come from a small exact table (df <= 30) and the
Cornish-Fisher expansion beyond it (Abramowitz & Stegun 26.7.5, within 1e-4 of the exact value there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

# Two-sided t quantiles t_{1-(1-level)/2, df} for df = 1..30, checked against a numerical inversion
# of the t CDF to 3 decimals.
T_TABLE: dict[float, tuple[float, ...]] = {
    0.90: (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
           1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
           1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697),
    0.95: (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
           2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
           2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
    0.99: (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169,
           3.106, 3.055, 3.012, 2.977, 2.947, 2.921, 2.898, 2.878, 2.861, 2.845,
           2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763, 2.756, 2.750),
}
# Past this many degrees of freedom the expansion is as good as the table's 3 decimals.
T_TABLE_MAX_DF = 30


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n.

    `successes` may be fractional (a tie counts as half a win). Unlike the normal (Wald) interval it
    stays inside [0, 1] and is sensible at 0/n and n/n, which small vote counts hit all the time.
    With no trials nothing is known: (0.0, 1.0).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson needs 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _cornish_fisher_t(z: float, df: int) -> float:
    """Student t quantile from the normal quantile z (A&S 26.7.5); accurate for large df."""
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student t critical value for a `level` interval with `df` degrees of freedom.

    df <= 30 reads the exact table, which covers levels 0.90, 0.95 and 0.99 only (ValueError
    otherwise); larger df uses the Cornish-Fisher expansion, which works for any level.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= T_TABLE_MAX_DF:
        table = T_TABLE.get(round(level, 6))
        if table is None:
            raise ValueError(f"level {level} with df={df} needs a t table; use one of {sorted(T_TABLE)}")
        return table[df - 1]
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    return _cornish_fisher_t(z, df)


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean with a Student t interval: {"mean", "lo", "hi", "n"}.

    n == 0 gives None for mean/lo/hi; n == 1 gives lo = hi = mean (no spread can be estimated, and
    an infinite interval would break the dashboard's plots).
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    n = int(arr.size)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(arr.mean())
    if n == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    half = t_quantile(level, n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def bootstrap_interval(values: Sequence[float], stat: Callable = np.mean, n_boot: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of `stat` over `values` (resampled with replacement).

    Deterministic for a given seed. No values gives (None, None): there is nothing to resample.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    stats = np.array([float(stat(arr[row])) for row in idx])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(new: Sequence[float], old: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """The mean difference new - old over paired items, with a percentile bootstrap interval:
    {"diff", "lo", "hi", "n"}.

    Item i is one prompt answered by both policies from the same seed, so new[i] and old[i] are
    resampled together (the items drawn with replacement, `n_boot` times): what varies between prompts
    cancels in each difference, and the interval is that of the change, not of the two means. Equal
    differences on every item give a zero-width interval at that value however spread the scores are.
    Deterministic for a given seed. No items gives None for diff, lo and hi.
    """
    a = np.asarray(new, dtype=np.float64).ravel()
    b = np.asarray(old, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"paired_bootstrap needs one old score per new score, got {a.size} new and {b.size} old")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap needs finite scores (a NaN or inf would make every resample NaN)")
    n = int(a.size)
    if n == 0:
        return {"diff": None, "lo": None, "hi": None, "n": 0}
    diffs = a - b
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    diff = float(diffs.mean())
    # A resampled mean of equal values can round a last bit away from their own mean: keep diff inside.
    return {"diff": diff, "lo": min(float(lo), diff), "hi": max(float(hi), diff), "n": n}


def labels_to_significance(rounds: Sequence[dict]) -> dict | None:
    """The first round, in order, after which the gold-mean difference's interval lies above zero:
    {"labels", "kl_to_v0", "round"}; None when no round gets there.

    Each round is a mapping with "labels" (labels so far), "gold_mean_diff_ci" ([lo, hi], or None when
    not measured) and "kl_to_v0" (and "round", reported back when there). A round with no labels yet
    (v0 against itself) never counts. This is the first crossing of a 95% interval looked at after every
    round, with no correction for the looks: over many rounds a policy that did not change would still
    cross now and then (each look alone: 2.5%), so read it next to the rounds after it.
    """
    for record, above in _measured_rounds(rounds):
        if above:
            return _reached(record)
    return None


def _measured_rounds(rounds: Sequence[dict]):
    """(round, whether its interval lies above zero) for each round with labels and a measured interval:
    round 0 (v0 against itself) and a round not measured count for neither significance measure."""
    for record in rounds:
        ci = record.get("gold_mean_diff_ci")
        if record.get("labels") and ci is not None and ci[0] is not None:
            yield record, ci[0] > 0


def _reached(record: dict) -> dict:
    return {"labels": record["labels"], "kl_to_v0": record.get("kl_to_v0"), "round": record.get("round")}


def labels_to_held_significance(rounds: Sequence[dict]) -> dict | None:
    """The first round after which the gold-mean difference's interval lies above zero in every measured
    round to the end: the same {"labels", "kl_to_v0", "round"} as `labels_to_significance`, or None when
    the last measured round is not above zero.

    A first crossing that falls back inside noise a round later is one lucky look, not a gain a team
    keeps (measured: two of the 2026-12-04 runs crossed at 64 labels and were back inside noise at 128,
    docs/BENCHMARKS.md). This one only counts a crossing the rest of the run agrees with, so it is never
    earlier than `labels_to_significance`; on a run whose last round is its only crossing the two agree.
    """
    held = None
    for record, above in _measured_rounds(rounds):
        if not above:
            held = None
        elif held is None:
            held = _reached(record)
    return held
