"""Over-optimisation, as numbers: best-of-n against a proxy, Gao et al.'s curves, and the peak verdict.

Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization") optimise a policy
against a learnt proxy reward and score it with the gold reward the proxy was learnt from. In
d = sqrt(KL to the initial policy), the gold gain over the initial policy follows

    best-of-n:  R(d) = d (alpha - beta d)
    RL:         R(d) = d (alpha - beta log d)

so the gold rises, peaks and falls while the proxy keeps rising. The functions here take plain
numbers (scores per sample, means with intervals) and import nothing of ours but the interval helpers,
so the bench and the dashboard compute the same things and tests feed them hand-made values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A fit of two parameters needs more points than parameters to say anything with its r2 (two points
# and the origin are fitted exactly by either form).
MIN_FIT_POINTS = 3
FORMS = ("best_of_n", "rl")


def best_of_n_kl(n: int) -> float:
    """The analytic KL of best-of-n to the policy it samples from: log n - (n - 1) / n (Stiennon et al.
    2020, the value Gao et al. plot). It is the exact KL when the n samples' scores have no ties, and
    an upper bound otherwise (Beirami et al. 2024)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(n_samples: int, n: int) -> np.ndarray:
    """P(the i-th lowest of n_samples values is the maximum of a uniformly random n-subset), i = 1..N:
    C(i - 1, n - 1) / C(N, n). Computed in logs, so N = 64 (or 10,000) neither overflows nor rounds away."""
    if not 1 <= n <= n_samples:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {n_samples}")
    log_total = _log_choose(n_samples, n)
    weights = np.array([math.exp(_log_choose(i - 1, n - 1) - log_total) if i >= n else 0.0
                        for i in range(1, n_samples + 1)])
    return weights / weights.sum()  # the sum is 1 by the hockey-stick identity, up to rounding


def _log_choose(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def best_of_n(proxy: Sequence[float], gold: Sequence[float], n: int) -> tuple[float, float]:
    """(expected proxy of the best, expected gold of the best) of n samples drawn without replacement
    from these N, the best being the one the proxy scores highest: the unbiased estimator over all
    C(N, n) subsets (Nakano et al. 2021, Gao et al. 2022), not disjoint groups of n, so every n uses all
    N samples and the estimate does not depend on how the samples happen to be grouped.

    Proxy ties are broken uniformly at random, which makes a tied group's gold count as its mean."""
    proxy = np.asarray(proxy, dtype=np.float64).ravel()
    gold = np.asarray(gold, dtype=np.float64).ravel()
    if proxy.shape != gold.shape or proxy.size == 0:
        raise ValueError(f"best_of_n needs as many gold as proxy scores, and some: got {proxy.size} and {gold.size}")
    if not (np.isfinite(proxy).all() and np.isfinite(gold).all()):
        raise ValueError("best_of_n needs finite scores")
    order = np.argsort(proxy, kind="stable")
    p, g = proxy[order], gold[order].copy()
    for value in np.unique(p[np.r_[False, p[1:] == p[:-1]]]):  # each proxy value that occurs twice or more
        tied = p == value
        g[tied] = g[tied].mean()
    weights = best_of_n_weights(p.size, n)
    return float(weights @ p), float(weights @ g)


def fit_gao(sqrt_kl: Sequence[float], gain: Sequence[float], form: str) -> dict | None:
    """Least squares of the gold gain on d = sqrt(KL), through the origin: form 'best_of_n' fits
    d (alpha - beta d), form 'rl' fits d (alpha - beta log d). Returns {"alpha", "beta", "r2", "n_points",
    "peak_sqrt_kl"} or None with fewer than MIN_FIT_POINTS points at d > 0.

    Points at d = 0 are left out: both forms pass through (0, 0), which is where a gain measured against
    the initial policy starts by definition, so such a point would only inflate r2. r2 is
    1 - SS_res / SS_tot about the points' mean (it can be negative: a curve through the origin may do
    worse than a flat line at the mean). peak_sqrt_kl is where the fitted curve peaks (None when it
    never turns down: beta <= 0)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if len(sqrt_kl) != len(gain):
        raise ValueError(f"{len(sqrt_kl)} sqrt_kl values but {len(gain)} gains")
    points = [(float(d), float(y)) for d, y in zip(sqrt_kl, gain)
              if d is not None and y is not None and math.isfinite(d) and math.isfinite(y) and d > 0]
    if len(points) < MIN_FIT_POINTS:
        return None
    d = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    shape = d * d if form == "best_of_n" else d * np.log(d)
    design = np.column_stack([d, -shape])
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ np.array([alpha, beta])
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else None
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2, "n_points": len(points),
            "peak_sqrt_kl": _peak(float(alpha), float(beta), form)}


def _peak(alpha: float, beta: float, form: str) -> float | None:
    if beta <= 0:
        return None
    if form == "best_of_n":  # d/dd [alpha d - beta d^2] = alpha - 2 beta d
        return alpha / (2 * beta)
    # d/dd [alpha d - beta d log d] = alpha - beta (log d + 1)
    return math.exp(alpha / beta - 1)


def gao_curve(params: dict, sqrt_kl: float, form: str) -> float:
    """The fitted gain at d = sqrt_kl (0 at d = 0 for both forms)."""
    d = float(sqrt_kl)
    if d <= 0:
        return 0.0
    shape = d * d if form == "best_of_n" else d * math.log(d)
    return params["alpha"] * d - params["beta"] * shape


def peak_visible(kl: Sequence[float], mean: Sequence[float], high: Sequence[float]) -> bool:
    """Whether gold visibly peaks before the largest KL: the point at the largest KL is not the peak
    (the highest mean), and its interval's upper end lies below the peak's mean, i.e. it is below the
    peak by more than its own interval. A monotone curve, or a fall smaller than the last point's
    interval, is False."""
    if not (len(kl) == len(mean) == len(high)):
        raise ValueError(f"peak_visible needs equally long lists, got {len(kl)}, {len(mean)}, {len(high)}")
    if len(kl) < 2:
        return False
    last = int(np.argmax(np.asarray(kl, dtype=np.float64)))
    peak = int(np.argmax(np.asarray(mean, dtype=np.float64)))
    return last != peak and float(high[last]) < float(mean[peak])


def monotone(kl: Sequence[float], values: Sequence[float], tolerance: float = 0.0) -> bool:
    """Whether values never fall (by more than `tolerance`) as KL grows."""
    if len(kl) != len(values):
        raise ValueError(f"{len(kl)} KL values but {len(values)} values")
    order = np.argsort(np.asarray(kl, dtype=np.float64), kind="stable")
    ordered = np.asarray(values, dtype=np.float64)[order]
    return bool(np.all(np.diff(ordered) >= -tolerance))
