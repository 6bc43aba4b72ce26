"""Weighted logistic regression without an intercept, by Newton's method (scikit-learn is not a dependency).

Bradley-Terry ratings are the coefficients of this regression (see arena.py). Two properties of that
use shape the fitter:

- The design is rank deficient: adding a constant to every model's coefficient changes no
  prediction. A tiny ridge (RIDGE, on every coefficient) makes the problem strictly convex and picks
  the mean-zero solution; callers re-anchor the ratings afterwards, so the choice is harmless.
- With few votes the data is often separable (v1 won every vote against v0) and the unpenalised
  maximum likelihood is infinite. The same ridge keeps it finite (large: a few thousand Elo points).
  On non-separable data its effect on a rating is negligible (about 1e-6 Elo points on four
  battles).
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-8
MAX_NEWTON_STEPS = 100
# Stop when the Newton decrement grad . step (about twice the objective still to gain) is this small.
# A step-size test would never stop: in the direction the ridge alone pins down, rounding noise in
# the gradient divided by the ridge's tiny curvature keeps the step near 1e-5 forever.
DECREMENT_TOL = 1e-12


def _objective(beta: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float) -> float:
    z = x @ beta
    # log(1 + e^z) - y z is the cross-entropy with soft labels: y = 0.5 is half a win each way.
    return float(np.sum(w * (np.logaddexp(0.0, z) - y * z)) + 0.5 * ridge * beta @ beta)


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
                 ridge: float = RIDGE) -> np.ndarray:
    """Coefficients beta maximising sum w * log-likelihood(y | sigmoid(x @ beta)) - ridge/2 |beta|^2.

    x is [n, k], y in [0, 1] (soft labels allowed), w >= 0 per row. Newton steps with step halving,
    so the objective never increases, until the Newton decrement says the optimum is reached.
    """
    n, k = x.shape
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    beta = np.zeros(k)
    value = _objective(beta, x, y, w, ridge)
    for _ in range(MAX_NEWTON_STEPS):
        p = np.exp(-np.logaddexp(0.0, -(x @ beta)))  # a sigmoid that does not overflow
        grad = x.T @ (w * (p - y)) + ridge * beta
        hess = (x.T * (w * p * (1 - p))) @ x + ridge * np.eye(k)
        step = np.linalg.solve(hess, grad)
        if grad @ step < DECREMENT_TOL:
            # Inside the quadratic region: one last full step leaves an error far below rounding.
            beta = beta - step
            break
        t = 1.0
        while t > 1e-12:
            candidate = beta - t * step
            new_value = _objective(candidate, x, y, w, ridge)
            if new_value <= value + 1e-12 * abs(value):
                break
            t /= 2
        else:
            break  # no descent left: at the optimum to machine precision
        beta, value = candidate, new_value
    return beta
