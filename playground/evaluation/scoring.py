"""The exact KL of a reply's own distributions to a reference's, cheaply: a few float32 passes.

`playground.metrics.kl.sequence_kl` (the reference definition) converts both [T, V] logit tensors to
float64 and makes about a dozen passes over them, each into a fresh tensor: ~170 ms for a 96-token reply
of SmolLM2 (V = 49152) on one core, and an evaluation needs ~500 of them (each reply against v0 and its
parent). Here the reply's own side is prepared once (`OwnDistribution`, shared by both references) and
each reference costs five float32 passes into one reused buffer (~20 ms for the same reply):

    KL_t = sum_v p_v (a_v - b_v) - (lse(a) - lse(b)),   lse(x) = max(x) + log sum_v exp(x_v - max(x))
         = sum_v p_v [(a_v - b_v) - (max(a) - max(b))] - (log sum_v e^(a_v - max a) - log sum_v e^(b_v - max b))

with a, b the two logit rows at position t and p = softmax(a). The difference of two close float32 logits
is exact (Sterbenz) and the maxima are exact; what rounds in float32 is each exponential, each product and
the partial sums (64 per row, of V / 64 terms each, ~5e-9 relative); the partials and the per-token results
combine in float64. It matches the float64 reference to ~1e-7 relative on KLs of 0.05 nats and more
(tests/test_evaluation.py), and a reply against the same policy, shifted, scores ~1e-8 a token, not the
~1e-6 that a float32 log_softmax's rounding of a ~30-nat normalizer would leave. A non-finite token
(masked logits) falls back to the reference definition.
"""

from __future__ import annotations

import torch

from playground.metrics.kl import sequence_kl


class Workspace:
    """One float32 scratch buffer, grown as needed and reused by every KL of an evaluation (a fresh
    19 MB tensor per pass costs as much as the pass: its pages are faulted in each time)."""

    def __init__(self):
        self._buffer = torch.empty(0)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        if self._buffer.numel() < t.numel() or self._buffer.device != t.device:
            self._buffer = torch.empty(t.numel(), dtype=torch.float32, device=t.device)
        return self._buffer[:t.numel()].view(t.shape)


SUM_CHUNKS = 64  # a float32 sum over V is taken as 64 interleaved partial sums, combined in float64


def _sum(x: torch.Tensor) -> torch.Tensor:
    """float64 [T]: the sum over the last axis of float32 x [T, V], each partial sum over V / 64 terms in
    float32 (vectorised, ~5e-9 relative) and the partials in float64; `sum(dtype=float64)` takes 20x as long."""
    n = x.shape[-1] // SUM_CHUNKS * SUM_CHUNKS
    if n == 0:
        return x.double().sum(dim=-1)
    total = x[:, :n].unflatten(-1, (SUM_CHUNKS, -1)).sum(dim=1).double().sum(dim=-1)
    if n < x.shape[-1]:
        total += x[:, n:].double().sum(dim=-1)
    return total


def _max_and_log_sum(x: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_v x [T, 1], log sum_v exp(x_v - max) float64 [T]); `work` is overwritten."""
    top = x.amax(dim=-1, keepdim=True)
    e = torch.sub(x, top, out=work).exp_()
    return top, _sum(e).log()


class OwnDistribution:
    """A reply's own logits a [T, V] (float32, temperature 1): p = softmax(a) and lse(a), computed once for
    every reference it is compared with."""

    def __init__(self, logits: torch.Tensor, workspace: Workspace | None = None):
        self.logits = logits.detach().float()
        self.workspace = workspace or Workspace()
        self.top = self.logits.amax(dim=-1, keepdim=True)
        # p = weights / total, left unnormalised: a float32 division would make sum(p) 1 +- 1e-7, which a
        # shift of the logits by c turns into a KL of c * 1e-7 per token where the true one is 0.
        self.weights = torch.sub(self.logits, self.top).exp_()
        self.total = _sum(self.weights)
        self.log_sum = self.total.log()

    def kl_to(self, logits_q: torch.Tensor) -> float:
        """KL(p || q) summed over the reply's positions: `metrics.kl.sequence_kl(self.logits, logits_q)`."""
        logits_q = logits_q.detach().float()
        if logits_q.shape != self.logits.shape:
            raise ValueError(f"logits shapes differ: {tuple(self.logits.shape)} vs {tuple(logits_q.shape)}")
        work = self.workspace.like(logits_q)
        top_q, log_sum_q = _max_and_log_sum(logits_q, work)
        # The maxima cancel out of the KL; taking their difference off a - b first leaves small terms
        # (a shifted policy: ~0 rather than c), which round to little however many are summed.
        centred = torch.sub(self.logits, logits_q, out=work).sub_(self.top - top_q)
        per_token = _sum(centred.mul_(self.weights)) / self.total - (self.log_sum - log_sum_q)
        if not bool(torch.isfinite(per_token).all()):  # -inf logits: the reference handles p = 0 exactly
            return sequence_kl(self.logits, logits_q)
        # Rounding can leave -1e-9 where the two distributions are equal; KL is never negative.
        return float(per_token.clamp_min(0.0).sum())
