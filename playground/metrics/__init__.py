"""Pure metric functions shared by the drift dashboard and the benchmarks.

Nothing here imports our own packages (the import contract in .importlinter checks it): only the
standard library, numpy and torch, so any layer can use them and tests feed them hand-made numbers.
"""

from playground.metrics.annotators import annotator_share, annotator_summary
from playground.metrics.arena import (
    bootstrap_bradley_terry,
    bradley_terry,
    length_feature,
    style_controlled_bradley_terry,
    win_rate,
)
from playground.metrics.drift import project_2d, semantic_drift, windowed_drift
from playground.metrics.frontier import fit_frontier
from playground.metrics.intervals import (
    bootstrap_interval,
    labels_to_held_significance,
    labels_to_significance,
    mean_interval,
    paired_bootstrap,
    t_quantile,
    wilson,
)
from playground.metrics.kl import sequence_kl, token_kl
from playground.metrics.logistic import fit_logistic
from playground.metrics.staleness import staleness, version_index
from playground.metrics.text import (
    distinct_n,
    identical_share,
    length_bias,
    length_summary,
    mean_pairwise_similarity,
)

__all__ = [
    "annotator_share",
    "annotator_summary",
    "bootstrap_bradley_terry",
    "bootstrap_interval",
    "bradley_terry",
    "distinct_n",
    "fit_frontier",
    "fit_logistic",
    "identical_share",
    "labels_to_held_significance",
    "labels_to_significance",
    "length_bias",
    "length_feature",
    "length_summary",
    "mean_interval",
    "mean_pairwise_similarity",
    "paired_bootstrap",
    "project_2d",
    "semantic_drift",
    "sequence_kl",
    "staleness",
    "style_controlled_bradley_terry",
    "t_quantile",
    "token_kl",
    "version_index",
    "wilson",
    "windowed_drift",
]
