"""Turn what callers pass as embeddings (lists, numpy arrays, torch tensors) into float64 matrices."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_matrix(embeddings: Any) -> np.ndarray:
    """A [k, d] float64 array from a list of rows, a numpy array or a torch tensor (on any device).

    An empty input becomes shape (0, 0); a single 1-D vector is one row.
    """
    if hasattr(embeddings, "detach"):  # a torch tensor; checked by duck type to keep torch optional here
        embeddings = embeddings.detach().cpu().double().numpy()
    arr = np.asarray(embeddings, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 0))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"embeddings must be [k, d], got shape {arr.shape}")
    return arr


def unit_rows(arr: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1; all-zero rows stay zero (their cosine with anything counts as 0)."""
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)
