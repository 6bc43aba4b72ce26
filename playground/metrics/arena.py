"""Arena ratings from pairwise votes: win rates, Bradley-Terry (MLE Elo), intervals, length control.

The method is FastChat's leaderboard (fastchat/serve/monitor/elo_analysis.py, `compute_mle_elo`,
`get_bootstrap_result`, and its "style control" in rating_systems.py): a logistic regression of the
outcome on +1 for model_a's column and -1 for model_b's, no intercept, ties as half a win each way
(FastChat duplicates the rows and splits a tie; a soft label of 0.5 is the same likelihood), ratings
scale * coefficient / ln(base) + init, shifted so the anchor model sits at init. Intervals are
percentiles of refits on battles resampled with replacement.

A battle is {"model_a", "model_b", "winner": "model_a" | "model_b" | "tie", optional "len_a",
"len_b"} with lengths in reply tokens.
"""

from __future__ import annotations

import math

import numpy as np

from playground.metrics.intervals import wilson
from playground.metrics.logistic import RIDGE, fit_logistic

# Score of model_a; FastChat's "tie (bothbad)" is a tie too.
WINNER_SCORE = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def win_rate(wins: int, losses: int, ties: int) -> dict:
    """{"wins", "losses", "ties", "n", "rate", "lo", "hi"}: ties as half a win, Wilson interval.

    n == 0 gives rate, lo and hi None.
    """
    n = wins + losses + ties
    if n == 0:
        return {"wins": wins, "losses": losses, "ties": ties, "n": 0, "rate": None, "lo": None, "hi": None}
    score = wins + ties / 2
    lo, hi = wilson(score, n)
    return {"wins": wins, "losses": losses, "ties": ties, "n": n, "rate": score / n, "lo": lo, "hi": hi}


def _design(battles: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Models in order of first appearance, the [n, models] +1/-1 design, and model_a's scores."""
    models: list[str] = []
    index: dict[str, int] = {}
    for b in battles:
        for name in (b["model_a"], b["model_b"]):
            if name not in index:
                index[name] = len(models)
                models.append(name)
    x = np.zeros((len(battles), len(models)))
    y = np.zeros(len(battles))
    for row, b in enumerate(battles):
        if b["winner"] not in WINNER_SCORE:
            raise ValueError(f"battle {row}: winner {b['winner']!r} is not one of {sorted(WINNER_SCORE)}")
        # += so a model against itself cancels to a row that carries no information
        x[row, index[b["model_a"]]] += 1.0
        x[row, index[b["model_b"]]] -= 1.0
        y[row] = WINNER_SCORE[b["winner"]]
    return models, x, y


def _ratings(x: np.ndarray, y: np.ndarray, w: np.ndarray, models: list[str], anchor: str,
             scale: float, base: float, init: float, ridge: float) -> np.ndarray:
    """Elo-scale ratings of the first len(models) coefficients; NaN for models absent under w.

    Without the anchor among the models the present models' ratings are centred on init. A
    resample that lost the anchor cannot be placed on the same scale and comes back all NaN.
    """
    p = len(models)
    beta = fit_logistic(x, y, w, ridge)
    ratings = scale * beta[:p] / math.log(base) + init
    present = (np.abs(x[:, :p]) * w[:, None]).sum(axis=0) > 0
    if anchor in models:
        a = models.index(anchor)
        if not present[a]:
            return np.full(p, np.nan)
        ratings += init - ratings[a]
    elif present.any():
        ratings += init - ratings[present].mean()
    ratings[~present] = np.nan
    return ratings


def bradley_terry(battles: list[dict], anchor: str = "v0", scale: float = 400, base: float = 10,
                  init: float = 1000, ridge: float = RIDGE) -> dict[str, float]:
    """FastChat's MLE Elo: {model: rating}, the anchor (when present) at exactly init, else their
    average at init.

    A beats B with probability 1 / (1 + base ** ((R_B - R_A) / scale)). `ridge` is logistic.RIDGE,
    there only to keep separable data finite (see logistic.py).
    """
    if not battles:
        return {}
    models, x, y = _design(battles)
    ratings = _ratings(x, y, np.ones(len(y)), models, anchor, scale, base, init, ridge)
    return {m: float(r) for m, r in zip(models, ratings)}


def _with_intervals(x: np.ndarray, y: np.ndarray, models: list[str], counts: dict[str, int], n_boot: int,
                    seed: int, level: float, **rating_kw) -> dict[str, dict]:
    """Full-data rating plus bootstrap percentile interval and battle count for each model."""
    n = len(y)
    full = _ratings(x, y, np.ones(n), models, **rating_kw)
    rng = np.random.default_rng(seed)
    boots = np.full((n_boot, len(models)), np.nan)
    for i in range(n_boot):
        # Resampling battles with replacement is a reweighting of the same rows.
        w = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        boots[i] = _ratings(x, y, w, models, **rating_kw)
    tail = (1 - level) / 2 * 100
    out: dict[str, dict] = {}
    for j, model in enumerate(models):
        col = boots[:, j][~np.isnan(boots[:, j])]
        lo = hi = None
        if col.size:
            lo, hi = (float(v) for v in np.percentile(col, [tail, 100 - tail]))
        out[model] = {"rating": float(full[j]), "lo": lo, "hi": hi, "n": counts[model]}
    return out


def _battle_counts(battles: list[dict], models: list[str]) -> dict[str, int]:
    """Battles each model was in; a model against itself played one battle, though its row cancels."""
    counts = dict.fromkeys(models, 0)
    for b in battles:
        for name in {b["model_a"], b["model_b"]}:
            counts[name] += 1
    return counts


def bootstrap_bradley_terry(battles: list[dict], n_boot: int = 200, seed: int = 0, *, anchor: str = "v0",
                            scale: float = 400, base: float = 10, init: float = 1000,
                            level: float = 0.95, ridge: float = RIDGE) -> dict[str, dict]:
    """{model: {"rating", "lo", "hi", "n"}}: bradley_terry on all battles, lo/hi the 2.5/97.5
    percentiles (for level 0.95) over n_boot resamples, n the battles the model was in.

    Deterministic for a seed. A model missing from a resample is left out of that resample's
    percentiles rather than counted at init. The anchor's interval has zero width: every other
    rating is measured relative to it.
    """
    if not battles:
        return {}
    models, x, y = _design(battles)
    return _with_intervals(x, y, models, _battle_counts(battles, models), n_boot, seed, level,
                           anchor=anchor, scale=scale, base=base, init=init, ridge=ridge)


def length_feature(battles: list[dict], center: bool = False) -> np.ndarray:
    """FastChat's length covariate: (len_a - len_b) / (len_a + len_b), divided by its std.

    Two empty replies give 0. FastChat also centres it, which is harmless there because the arena
    randomises which side a model is on; here a caller may always put the candidate as model_a, and
    centring would then fold the average length gap back into the ratings. So it is only scaled
    unless center=True. A constant (all-zero) feature stays zero and controls nothing.
    """
    la = np.array([b["len_a"] for b in battles], dtype=np.float64)
    lb = np.array([b["len_b"] for b in battles], dtype=np.float64)
    total = la + lb
    f = np.divide(la - lb, total, out=np.zeros_like(total), where=total > 0)
    if center:
        f = f - f.mean()
    std = f.std() if f.size else 0.0
    return f / std if std > 0 else np.zeros_like(f)


def style_controlled_bradley_terry(battles: list[dict], n_boot: int = 200, seed: int = 0, *,
                                   anchor: str = "v0", scale: float = 400, base: float = 10,
                                   init: float = 1000, level: float = 0.95, ridge: float = RIDGE,
                                   center: bool = False) -> dict[str, dict]:
    """Length-controlled ratings, shaped like bootstrap_bradley_terry's output.

    The regression gets the standardised length difference (length_feature) as one more covariate,
    so a model's rating is what it would earn against an equally long reply. Battles without both
    len_a and len_b are skipped (and not counted in n). The feature is standardised once on all
    used battles, as FastChat does, and the resamples reuse it.
    """
    used = [b for b in battles if b.get("len_a") is not None and b.get("len_b") is not None]
    if not used:
        return {}
    models, x, y = _design(used)
    x = np.column_stack([x, length_feature(used, center=center)])
    return _with_intervals(x, y, models, _battle_counts(used, models), n_boot, seed, level,
                           anchor=anchor, scale=scale, base=base, init=init, ridge=ridge)
