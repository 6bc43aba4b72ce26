"""The over-optimisation frontier: win rate against the reference as a function of sqrt(KL).

Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") find the gold reward of
best-of-n and RL policies follows d * (alpha - beta * d) in d = sqrt(KL to the initial policy). Here
the "reward" is the win rate against the reference, so the curve gets an intercept w0:
win(d) = w0 + d * (alpha - beta * d). It peaks at d = alpha / (2 beta) where beta > 0: past that,
training buys KL and loses votes.
"""

from __future__ import annotations

import math

import numpy as np

MIN_POINTS = 4
CURVE_POINTS = 50
# A version against itself wins half its votes, so that is the intercept when none was measured.
DEFAULT_W0 = 0.5


def fit_frontier(sqrt_kl: list[float], win_rate: list[float]) -> dict | None:
    """Least-squares fit of win(d) = w0 + d * (alpha - beta * d): {"alpha", "beta", "w0", "curve"}.

    When some point has d == 0, w0 is fitted with alpha and beta (the measured value at d = 0 and
    its neighbours set it); otherwise w0 is fixed at 0.5. Non-finite points are dropped; with fewer
    than 4 left the fit is None. curve is [[d, win], ...] at 50 evenly spaced d from 0 to max d.
    """
    if len(sqrt_kl) != len(win_rate):
        raise ValueError(f"{len(sqrt_kl)} sqrt_kl values but {len(win_rate)} win rates")
    points = [(float(d), float(w)) for d, w in zip(sqrt_kl, win_rate)
              if d is not None and w is not None and math.isfinite(d) and math.isfinite(w)]
    if len(points) < MIN_POINTS:
        return None
    d = np.array([p[0] for p in points])
    w = np.array([p[1] for p in points])
    if np.any(d == 0):
        design = np.column_stack([np.ones_like(d), d, -d * d])
        (w0, alpha, beta), *_ = np.linalg.lstsq(design, w, rcond=None)
    else:
        w0 = DEFAULT_W0
        (alpha, beta), *_ = np.linalg.lstsq(np.column_stack([d, -d * d]), w - w0, rcond=None)
    grid = np.linspace(0.0, float(d.max()), CURVE_POINTS)
    curve = w0 + grid * (alpha - beta * grid)
    return {"alpha": float(alpha), "beta": float(beta), "w0": float(w0),
            "curve": [[float(x), float(y)] for x, y in zip(grid, curve)]}
