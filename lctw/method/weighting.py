"""Step 2 of the method: turn per-target scores into loss weights.

Every weighting is a callable ``w(long_logprobs, short_logprobs, mask) -> weights`` on (B, T) tensors,
and ranks targets by its own ``scores(long, short)`` (the s_i below; logged as ``train/score_mean``):
``long_logprobs`` = log p_θ(x_i | full context), ``short_logprobs`` = log p_θ'(x_i | ≤ n tokens),
``mask`` True for valid targets. Weights are computed per sequence over its M valid targets, are
detached (no gradient flows through them) and are 0 on invalid targets. The formulas are the table of
the spec (Helm et al., 2025; LongCE of Fang et al., 2025):

    uniform  w_i = 1
    dense    ŵ_i = M s_i / Σ_j s_j,  w_i = lam + (1 - lam) ŵ_i,        s_i = |short_i - long_i|
    sparse   top k = max(1, ⌊kappa M⌋) targets by s_i get M / k, others 0 (optionally interpolated with lam)
    longce   w_i = min(exp(long_i - short_i), gamma)
    ppmi     s_i = max(long_i - short_i - log shift, 0), then sparse top-kappa
    npmi     s_i = max(short_i - long_i - log shift, 0), then sparse top-kappa

    >>> Dense(0.5)(torch.zeros(1, 3), torch.tensor([[0.0, -1.0, -3.0]]), torch.ones(1, 3, dtype=torch.bool))
    tensor([[0.5000, 0.8750, 1.6250]])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ⌊kappa·M⌋ in floating point drops a whole target for values such as 0.29·100 = 28.999999999999996;
# a guard far below 1/M restores the exact integer without changing any other case.
_FLOOR_GUARD = 1e-9


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value} is out of range: allowed {allowed}")


class Weighting:
    """Base class: subclasses implement ``weights`` on detached inputs; this applies mask and detach."""

    needs_scores = True  # False only for uniform: it needs no short-context model

    def __call__(self, long_logprobs: Tensor, short_logprobs: Tensor | None, mask: Tensor) -> Tensor:
        mask = mask.bool()
        if self.needs_scores and short_logprobs is None:
            raise ValueError(f"weighting={self.name} needs short-context log-probs: pick a scorer other than none")
        with torch.no_grad():
            long_lp = long_logprobs.detach().float()
            short_lp = None if short_logprobs is None else short_logprobs.detach().float()
            w = self.weights(long_lp, short_lp, mask)
            return torch.where(mask, w, torch.zeros_like(w))

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def scores(self, long_lp: Tensor, short_lp: Tensor) -> Tensor:
        """s_i, what this weighting ranks targets by: the spec's |short_i − long_i| unless it says otherwise."""
        return (short_lp - long_lp).abs()

    def weights(self, long_lp: Tensor, short_lp: Tensor | None, mask: Tensor) -> Tensor:
        raise NotImplementedError


class Uniform(Weighting):
    needs_scores = False

    def weights(self, long_lp, short_lp, mask):
        return torch.ones_like(long_lp)


class Dense(Weighting):
    """Interpolate uniform weights with L1-normalized absolute score differences."""

    def __init__(self, lam: float = 0.75):
        _check("lam", lam, 0.0 <= lam <= 1.0, "[0, 1] (1 = uniform)")
        self.lam = float(lam)

    def weights(self, long_lp, short_lp, mask):
        s = torch.where(mask, self.scores(long_lp, short_lp), torch.zeros_like(long_lp))
        m = mask.sum(-1, keepdim=True).float()
        total = s.sum(-1, keepdim=True)
        w_hat = torch.where(total > 0, m * s / total.clamp_min(torch.finfo(s.dtype).tiny), torch.ones_like(s))
        return self.lam + (1.0 - self.lam) * w_hat


class Sparse(Weighting):
    """Keep the top-kappa fraction of targets by score; ties are broken by a seeded random order.

    Each call draws a fresh random order from the weighting's own CPU generator, so runs with the same
    seed and data give the same weights on any device, while ties do not always favour early positions.
    ``lam`` is the interpolation step of the paper's general form, w = lam + (1 - lam)·w_sparse; the
    default 0 is the table's sparse weighting. It lets one sweep ``weighting.lam`` over dense and sparse.
    """

    def __init__(self, kappa: float = 0.25, seed: int = 0, lam: float = 0.0):
        _check("kappa", kappa, 0.0 < kappa <= 1.0, "(0, 1] (1 = uniform)")
        _check("lam", lam, 0.0 <= lam <= 1.0, "[0, 1] (0 = pure top-kappa, 1 = uniform)")
        self.kappa, self.lam = float(kappa), float(lam)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def weights(self, long_lp, short_lp, mask):
        s = self.scores(long_lp, short_lp)
        return self.lam + (1.0 - self.lam) * top_k_weights(s, mask, self.kappa, self.generator)


def top_k_weights(scores: Tensor, mask: Tensor, kappa: float, generator: torch.Generator) -> Tensor:
    """M/k on the k = max(1, ⌊kappa·M⌋) highest-scoring valid targets of each row, 0 elsewhere."""
    b, t = scores.shape
    m = mask.sum(-1)
    k = torch.clamp(torch.floor(kappa * m.double() + _FLOOR_GUARD).long(), min=1)
    # A random permutation followed by a stable sort ranks equal scores in random (seeded) order.
    perm = torch.stack([torch.randperm(t, generator=generator) for _ in range(b)]).to(scores.device)
    s = torch.where(mask, scores, torch.full_like(scores, -math.inf)).gather(1, perm)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(t, device=scores.device).expand(b, t))
    kept = ranks < k[:, None]  # in permuted coordinates; scatter back to positions
    keep = torch.zeros_like(kept).scatter_(1, perm, kept) & mask
    return torch.where(keep, (m.float() / k.float())[:, None], torch.zeros_like(scores))


class LongCE(Weighting):
    """LongCE (Fang et al., 2025): the likelihood ratio p_long / p_short, clipped at gamma."""

    def __init__(self, gamma: float = 5.0):
        _check("gamma", gamma, gamma > 0, "> 0")
        self.gamma = float(gamma)

    def scores(self, long_lp, short_lp):
        return long_lp - short_lp  # the log likelihood ratio; the weight is its exp, clipped

    def weights(self, long_lp, short_lp, mask):
        return torch.exp(self.scores(long_lp, short_lp)).clamp(max=self.gamma)


class PPMI(Sparse):
    """Top-kappa on positive shifted PMI: targets the long context makes *more* likely."""

    def __init__(self, kappa: float = 0.25, shift: float = 1.0, seed: int = 0, lam: float = 0.0):
        super().__init__(kappa, seed, lam)
        _check("shift", shift, shift > 0, "> 0 (the PMI shift c; log c is subtracted)")
        self.shift = float(shift)

    def scores(self, long_lp, short_lp):
        return (long_lp - short_lp - math.log(self.shift)).clamp_min(0.0)


class NPMI(PPMI):
    """Top-kappa on negative shifted PMI: targets the long context makes *less* likely."""

    def scores(self, long_lp, short_lp):
        return (short_lp - long_lp - math.log(self.shift)).clamp_min(0.0)


def score_stats(scores: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Diagnostics of a weighting's scores over valid targets: their mean, and the rows where every score is
    zero (dense gives them uniform weights; LongCE's scores are signed, so a row that sums to zero need not be)."""
    scores = scores * mask
    return {"zero_score_rows": (scores != 0).any(-1).logical_not().float().sum(),
            "score_mean": scores.sum() / mask.sum().clamp_min(1)}


def weight_stats(weights: Tensor, mask: Tensor, n: int) -> dict[str, Tensor]:
    """Diagnostics of the weights over valid targets (per sequence where the spec normalises per sequence):
    mean, std, max, the fraction at zero, ESS = (Σw)²/Σw²/M, and the weight mass on targets beyond n."""
    m = mask.float()
    count = m.sum().clamp_min(1)
    w = weights * m
    mean = w.sum() / count
    std = (((weights - mean) * m) ** 2).sum().div(count).sqrt()
    ess = (w.sum(-1) ** 2 / (w**2).sum(-1).clamp_min(1e-12) / m.sum(-1).clamp_min(1)).mean()
    beyond = torch.arange(mask.shape[1], device=mask.device) >= n
    return {
        "weight_mean": mean,
        "weight_std": std,
        "weight_max": w.max(),
        "weight_zero_frac": ((weights == 0) & mask).float().sum() / count,
        "weight_ess": ess,
        "weight_mass_beyond_n": w[:, beyond].sum() / w.sum().clamp_min(1e-12),
    }
