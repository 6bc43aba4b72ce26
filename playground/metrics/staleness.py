"""How off-policy a training round's pairs are: who sampled them, and how far that is from now.

DPO's pairs are meant to come from (near) the policy being trained. Pairs sampled by older versions
are stale: a long lag, or a large gap between the log-prob a reply had when sampled and its
log-prob under the version trained from, says the round learns from a policy that no longer exists.
"""

from __future__ import annotations

import re
import statistics

VERSION_RE = re.compile(r"v(\d+)")
# An arena pair is sampled by two versions at once, "v0|v3".
ARENA_SEP = "|"


def version_index(version: str) -> int:
    """The number of a "v<int>" version; of an arena pair "v0|v3", the newest of the two (3)."""
    indices = []
    for part in str(version).split(ARENA_SEP):
        match = VERSION_RE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"version {version!r} is not 'v<int>' or 'v<int>|v<int>'")
        indices.append(int(match.group(1)))
    return max(indices)


def staleness(pairs: list[dict], trained_from: str) -> dict:
    """{"n", "share_older", "mean_lag", "off_policy_gap", "n_gap"} of the pairs a round trains on.

    share_older: share sampled by a version older than trained_from. mean_lag: mean of
    index(trained_from) - index(sampler), floored at 0 (a pair from a newer version is not "ahead").
    off_policy_gap: mean of stored_logprob - logprob_trained_from over the n_gap pairs that have both
    (None if none); positive means the replies have become less likely under the current policy.
    With no pairs, share_older and mean_lag are None.
    """
    current = version_index(trained_from)
    n = len(pairs)
    if n == 0:
        return {"n": 0, "share_older": None, "mean_lag": None, "off_policy_gap": None, "n_gap": 0}
    samplers = [version_index(p["policy_version"]) for p in pairs]
    gaps = [p["stored_logprob"] - p["logprob_trained_from"] for p in pairs
            if p.get("stored_logprob") is not None and p.get("logprob_trained_from") is not None]
    return {
        "n": n,
        "share_older": sum(s < current for s in samplers) / n,
        "mean_lag": sum(max(0, current - s) for s in samplers) / n,
        "off_policy_gap": float(statistics.fmean(gaps)) if gaps else None,
        "n_gap": len(gaps),
    }
