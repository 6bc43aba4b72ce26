"""Where the replies move in embedding space as versions are trained: drift and a 2-D map.

Embeddings are [n, d] rows (one per reply) as lists, numpy arrays or torch tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from playground.metrics._arrays import as_matrix


def semantic_drift(emb_a: Any, emb_b: Any) -> float | None:
    """1 - cosine(mean row of a, mean row of b): 0 for the same centroid direction, up to 2.

    None when either set is empty, or a centroid is the zero vector (no direction to compare).
    """
    a, b = as_matrix(emb_a), as_matrix(emb_b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return None
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {a.shape[1]} vs {b.shape[1]}")
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    na, nb = np.linalg.norm(ca), np.linalg.norm(cb)
    if na == 0 or nb == 0:
        return None
    # 1 - cos(u, v) = |u - v|^2 / 2 for unit u, v: exact 0 for equal centroids, and no cancellation
    # for the small drifts that matter (1 - u.v loses them to rounding).
    diff = ca / na - cb / nb
    return float(diff @ diff) / 2


def project_2d(embeddings: Any) -> np.ndarray:
    """[n, 2] PCA projection of the rows (centred, numpy SVD) for the dashboard's scatter plot.

    The sign of a principal axis is arbitrary in SVD; each is flipped so its largest-|value| loading
    is positive, so the same data plots the same way on every refresh. Fewer than 2 rows, or a
    missing second component (d == 1, all rows on a line), give zeros in that column.
    """
    arr = as_matrix(embeddings)
    n = arr.shape[0]
    out = np.zeros((n, 2))
    if n < 2:
        return out
    centred = arr - arr.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(min(2, vt.shape[0])):
        if s[k] <= s[0] * 1e-12:  # no variance left: the axis is noise, not a direction
            break
        axis = vt[k]
        if axis[np.argmax(np.abs(axis))] < 0:
            axis = -axis
        out[:, k] = centred @ axis
    return out


def windowed_drift(embeddings: Any, n_windows: int) -> list[dict]:
    """Drift of each time window from the first: [{"window", "n", "drift"}, ...].

    Rows must be in time order; they are split into n_windows consecutive windows as evenly as
    possible (earlier windows take the remainder). A window with no rows, or drift from an empty
    first window, has drift None.
    """
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    arr = as_matrix(embeddings)
    windows = np.array_split(arr, n_windows) if arr.shape[0] else [arr] * n_windows
    first = windows[0]
    return [{"window": i, "n": int(w.shape[0]), "drift": semantic_drift(first, w)}
            for i, w in enumerate(windows)]
