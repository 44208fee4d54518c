"""The meta-weight network ``w_phi(s)`` (paper Sec. 3.3, docs/math.md section 4).

``w_phi(s) = softplus(v^T s_hat + b)`` (7 parameters) or an MLP 6-32-1, where ``s_hat`` is the
feature vector ``s = [f1, ema1, f2, ema2, f3, ema3]`` after a per-feature normalisation
(``feature_norm``):

    rms:          s_hat_j = s_j / (rms_j + 1e-8),           rms_j = sqrt(EMA of mean_i s_ij^2)
    standardize:  s_hat_j = (s_j - mu_j) / (sd_j + 1e-8),   mu_j = EMA of mean_i s_ij,  sd_j^2 = EMA of s^2 - mu_j^2

The EMAs (momentum 0.99, Adam-style bias correction so the first batch gets its own statistics)
are updated by :meth:`update_stats` (the trainer calls it once per optimiser step, with every
micro-batch's features, after the step used them), from the global batch when several ranks run (all-reduced, so every rank's replica stays identical); they are
deterministic, carry no gradient, and are part of ``state_dict()``. ``rms`` keeps each feature's
sign (a negative margin stays negative), so the learned coefficients read like the paper's
Fig. 3c; ``standardize`` also centres, so a coefficient moves weights around the batch mean and
the bias alone sets the mean weight.

Initialisation: ``v = 0`` and ``b = softplus^-1(1) = log(e - 1)`` (MLP: last layer zero, bias the
same), so every weight is exactly 1 and MetaPO starts as its base loss.

Batch-mean normalisation (``normalize="batch_mean"``): ``w_i <- w_i / mean_j w_j``, differentiated
through, the mean taken over the pairs of every rank (an autograd-aware all-reduce). Without it
the SGD lookahead of the meta-gradient believes a global shrink of all weights helps (it scales the
step), which an adaptive inner optimiser (Adam) ignores; the trainer enables it by default for
adaptive inner optimisers (math.md section 4). The trainer normalises over the whole optimiser
step (every micro-batch and rank): it takes raw weights (``normalize=False``) and divides the
step's gradient by their mean (``train/loop.py``, the engines' ``clip_and_check``).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..comm import all_reduce_sum, world_size
from ..ops.tracker_update import FEATURE_NAMES

__all__ = ["MetaWeightNet", "MarginWeights", "PairFilter", "SOFTPLUS_INV_ONE", "feature_subset", "global_mean"]

SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(b) = 1

# Named feature subsets of the paper's ablations (Table 6).
_ABLATIONS = {
    "all": FEATURE_NAMES,
    "no_margin": ("std", "ema_std", "kl", "ema_kl"),
    "no_volatility": ("margin", "ema_margin", "kl", "ema_kl"),
    "no_reference": ("margin", "ema_margin", "std", "ema_std"),
    "no_temporal": ("margin", "std", "kl"),
}


def feature_subset(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Resolve an ablation name (``all``, ``no_margin``, ``no_volatility``, ``no_reference``,
    ``no_temporal``) or an explicit list of feature names into a tuple of names."""
    if isinstance(spec, str):
        if spec not in _ABLATIONS:
            raise ValueError(f"unknown feature subset {spec!r}; expected one of {sorted(_ABLATIONS)} or a list of {FEATURE_NAMES}")
        return tuple(_ABLATIONS[spec])
    names = tuple(spec)
    bad = [n for n in names if n not in FEATURE_NAMES]
    if bad or not names:
        raise ValueError(f"features must be a non-empty subset of {FEATURE_NAMES}, got {list(names)}")
    return names


class MetaWeightNet(nn.Module):
    """Per-pair weights from temporal features.

    Args:
        arch: ``"linear"`` (paper default, 7 parameters) or ``"mlp"`` (6-32-1, ReLU).
        features: ablation name or list of feature names kept; the others are zeroed.
        normalize: ``"none"`` or ``"batch_mean"`` (weights divided by their mean over all ranks).
        hidden: MLP width.
        stats_momentum: momentum of the feature-statistics EMAs.
        feature_norm: ``"rms"`` (scale only) or ``"standardize"`` (centre and scale).
    """

    def __init__(
        self,
        arch: str = "linear",
        features: str | Sequence[str] = "all",
        normalize: str = "none",
        hidden: int = 32,
        stats_momentum: float = 0.99,
        feature_norm: str = "rms",
    ):
        super().__init__()
        if arch not in ("linear", "mlp"):
            raise ValueError(f"MetaWeightNet.arch must be 'linear' or 'mlp', got {arch!r}")
        if normalize not in ("none", "batch_mean"):
            raise ValueError(f"MetaWeightNet.normalize must be 'none' or 'batch_mean', got {normalize!r}")
        if feature_norm not in ("rms", "standardize"):
            raise ValueError(f"MetaWeightNet.feature_norm must be 'rms' or 'standardize', got {feature_norm!r}")
        if not 0.0 <= stats_momentum < 1.0:
            raise ValueError(f"MetaWeightNet.stats_momentum must be in [0, 1), got {stats_momentum}")
        self.arch, self.normalize, self.stats_momentum, self.feature_norm = arch, normalize, stats_momentum, feature_norm
        self.feature_names = feature_subset(features)
        mask = torch.tensor([1.0 if n in self.feature_names else 0.0 for n in FEATURE_NAMES])
        self.register_buffer("feature_mask", mask)
        self.register_buffer("sq_ema", torch.zeros(len(FEATURE_NAMES), dtype=torch.float64))
        self.register_buffer("mean_ema", torch.zeros(len(FEATURE_NAMES), dtype=torch.float64))
        self.register_buffer("stats_steps", torch.zeros((), dtype=torch.float64))
        if arch == "linear":
            self.v = nn.Parameter(torch.zeros(len(FEATURE_NAMES)))
            self.b = nn.Parameter(torch.tensor(SOFTPLUS_INV_ONE))
        else:
            self.hidden_layer = nn.Linear(len(FEATURE_NAMES), hidden)
            self.out_layer = nn.Linear(hidden, 1)
            nn.init.zeros_(self.out_layer.weight)
            nn.init.constant_(self.out_layer.bias, SOFTPLUS_INV_ONE)

    # -- normalisation -------------------------------------------------------------------------
    @torch.no_grad()
    def update_stats(self, s: torch.Tensor) -> None:
        """Fold a training batch's feature means and mean squares into the EMAs (no gradient)."""
        m = self.stats_momentum
        x = s.detach().to(torch.float64)
        moments = torch.stack([x.mean(0), x.pow(2).mean(0)])
        if world_size() > 1:  # every rank keeps an identical replica: the global batch (equal per-rank sizes)
            all_reduce_sum(moments).div_(world_size())
        self.mean_ema.mul_(m).add_((1 - m) * moments[0])
        self.sq_ema.mul_(m).add_((1 - m) * moments[1])
        self.stats_steps.add_(1)

    def _corrected(self, ema: torch.Tensor) -> torch.Tensor:
        corr = (1 - self.stats_momentum ** self.stats_steps).clamp(min=1e-300)
        return ema / corr

    def center(self) -> torch.Tensor:
        """Per-feature centre subtracted before scaling (zeros for ``rms`` or before any statistics)."""
        if self.feature_norm == "rms":
            return torch.zeros_like(self.mean_ema)
        return torch.where(self.stats_steps > 0, self._corrected(self.mean_ema), torch.zeros_like(self.mean_ema))

    def scale(self) -> torch.Tensor:
        """Per-feature scale used to normalise: the RMS (``rms``) or the standard deviation
        (``standardize``); ones before any statistics were gathered."""
        # torch.where instead of a Python branch: no host sync when the net lives on a GPU.
        sq = self._corrected(self.sq_ema)
        if self.feature_norm == "standardize":
            sq = (sq - self._corrected(self.mean_ema).pow(2)).clamp(min=0)
        return torch.where(self.stats_steps > 0, sq.sqrt(), torch.ones_like(sq))

    def normalize_features(self, s: torch.Tensor) -> torch.Tensor:
        scale = (self.scale() + 1e-8).to(s.dtype)
        return (s - self.center().to(s.dtype)) / scale * self.feature_mask.to(s.dtype)

    # -- weights -------------------------------------------------------------------------------
    def preactivation(self, s_hat: torch.Tensor) -> torch.Tensor:
        """``v^T s_hat + b`` (linear) or the MLP's last-layer output, shape ``(B,)``."""
        if self.arch != "mlp":  # linear (and the fixed ema_margin baseline)
            return s_hat @ self.v.to(s_hat.dtype) + self.b.to(s_hat.dtype)
        h = F.relu(F.linear(s_hat, self.hidden_layer.weight.to(s_hat.dtype), self.hidden_layer.bias.to(s_hat.dtype)))
        return F.linear(h, self.out_layer.weight.to(s_hat.dtype), self.out_layer.bias.to(s_hat.dtype)).squeeze(-1)

    def forward(self, s: torch.Tensor, update_stats: bool = False, normalize: bool = True,
                over_ranks: bool = True) -> torch.Tensor:
        """Weights ``(B,)`` for features ``s (B, 6)``; differentiable in phi (not in s).
        ``normalize=False`` returns the raw weights even with ``batch_mean`` (the caller then
        normalises over a larger batch, e.g. a whole optimiser step). ``over_ranks=False`` takes the
        ``batch_mean`` over this call's rows only (no collective: for a caller that already holds
        every pair, on one rank)."""
        if s.dim() != 2 or s.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"MetaWeightNet: features must have shape (B, {len(FEATURE_NAMES)}), got {tuple(s.shape)}")
        s = s.detach().float()
        if update_stats:
            self.update_stats(s)
        w = self.activation(self.preactivation(self.normalize_features(s)))
        if normalize and self.normalize == "batch_mean":
            w = w / global_mean(w, over_ranks).clamp(min=1e-12)
        return w

    activation = staticmethod(F.softplus)

    # -- interpretability (paper Sec. 4.9, App. C; math.md section 8) ----------------------------
    def coefficients(self) -> dict[str, float]:
        """Learned ``v`` per feature and ``b`` (linear net only)."""
        if self.arch != "linear":
            raise ValueError("coefficients() is defined for the linear meta-network only")
        out = {n: float(x) for n, x in zip(FEATURE_NAMES, self.v.detach().cpu())}
        out["bias"] = float(self.b.detach())
        return out

    @torch.no_grad()
    def shapley(self, s: torch.Tensor) -> torch.Tensor:
        """Exact Shapley values on the pre-activation for the linear net:
        ``phi_ij = v_j (s_hat_ij - mean_i s_hat_ij)``, shape ``(B, 6)``; rows sum to
        ``pre_i - mean(pre)``."""
        if self.arch != "linear":
            raise ValueError("exact Shapley values are implemented for the linear meta-network only")
        s_hat = self.normalize_features(s.float())
        return self.v.detach() * (s_hat - s_hat.mean(0, keepdim=True))

    def phi_parameters(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, features={list(self.feature_names)}, normalize={self.normalize}, "
                f"feature_norm={self.feature_norm}")


class MarginWeights(MetaWeightNet):
    """The learned-free baseline: ``w_i = sigmoid(kappa * ema_margin_hat_i)``, the EMA of the margin
    after the same feature normalisation as :class:`MetaWeightNet` (so ``kappa`` is scale-free),
    normalised to mean 1 like ``batch_mean``. Nothing is learned (``meta.weighting=ema_margin``)."""

    activation = staticmethod(torch.sigmoid)

    def __init__(self, kappa: float, normalize: str = "batch_mean", stats_momentum: float = 0.99, feature_norm: str = "rms"):
        super().__init__("linear", "all", normalize, stats_momentum=stats_momentum, feature_norm=feature_norm)
        if not kappa > 0:
            raise ValueError(f"MarginWeights: kappa must be > 0, got {kappa}")
        with torch.no_grad():
            self.v.zero_()[FEATURE_NAMES.index("ema_margin")] = kappa
            self.b.zero_()
        self.requires_grad_(False)
        self.arch = "fixed"


class PairFilter(nn.Module):
    """Static filtering (paper App. A.8; ``meta.weighting=static_filter``): every pair weighs 1
    until step ``after_steps``; then :meth:`fit` drops, for the rest of the run, the ``fraction`` of
    training pairs with the lowest policy margin z (exactly ``round(fraction * n)`` pairs; ties
    broken by pair id), i.e. weight ``filtered_weight`` (0: dropped), the others 1 (normalised like
    ``batch_mean`` when that is the run's normalisation). The kept set is a buffer, so it resumes
    exactly. Nothing is learned.

    Weights depend on the pair, not on its features: call :meth:`pair_weights` with pair ids.
    """

    arch = "filter"

    def __init__(self, num_pairs: int, after_steps: int, fraction: float, normalize: str = "batch_mean",
                 filtered_weight: float = 0.0):
        super().__init__()
        if num_pairs < 1 or after_steps < 1 or not 0.0 < fraction < 1.0:
            raise ValueError(f"PairFilter: need num_pairs >= 1, after_steps >= 1 and 0 < fraction < 1, "
                             f"got {num_pairs}, {after_steps}, {fraction}")
        if normalize not in ("none", "batch_mean"):
            raise ValueError(f"PairFilter: normalize must be 'none' or 'batch_mean', got {normalize!r}")
        if not 0.0 <= filtered_weight < 1.0:
            raise ValueError(f"PairFilter: filtered_weight must be in [0, 1), got {filtered_weight}")
        self.after_steps, self.fraction, self.normalize = after_steps, fraction, normalize
        self.filtered_weight = filtered_weight
        self.register_buffer("keep", torch.ones(num_pairs))

    @torch.no_grad()
    def fit(self, margins, count: Optional[int] = None) -> int:
        """Drop the ``count`` pairs (default ``round(fraction * n)``) with the lowest ``margins``
        (one per pair, in pair-id order); returns how many were dropped. Deterministic: the same
        margins give the same set on every rank."""
        z = torch.as_tensor(margins, dtype=torch.float64).cpu()
        if z.shape != self.keep.shape:
            raise ValueError(f"PairFilter.fit: margins must have shape {tuple(self.keep.shape)} (one per training pair), "
                             f"got {tuple(z.shape)}")
        k = int(round(self.fraction * z.numel())) if count is None else int(count)
        if not 0 <= k <= z.numel():
            raise ValueError(f"PairFilter.fit: count must be in [0, {z.numel()}], got {count}")
        order = torch.sort(z, stable=True).indices  # ties: the lower pair id first
        keep = torch.ones_like(z)
        keep[order[:k]] = self.filtered_weight
        self.keep.copy_(keep.to(self.keep.dtype))
        return k

    def pair_weights(self, pair_ids: torch.Tensor, normalize: bool = True, over_ranks: bool = True) -> torch.Tensor:
        """Weights ``(B,)`` of the pairs ``pair_ids`` (``filtered_weight`` for a filtered pair, before normalisation)."""
        w = self.keep[pair_ids]
        if normalize and self.normalize == "batch_mean":
            w = w / global_mean(w, over_ranks).clamp(min=1e-12)
        return w

    def update_stats(self, s: torch.Tensor) -> None:  # no feature statistics
        return None

    def extra_repr(self) -> str:
        return (f"after_steps={self.after_steps}, fraction={self.fraction}, normalize={self.normalize}, "
                f"filtered_weight={self.filtered_weight}")


def prompt_centred(margins, groups) -> np.ndarray:
    """``z_i - mean(z_j : j in the prompt group of i)``, float64: each pair's margin relative to the
    other pairs of its prompt (``meta.filter_by=prompt_margin``), so that a prompt whose pairs all
    have low margins (a hard prompt, not a mislabelled one) does not lose them all."""
    z = np.asarray(margins, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    if z.shape != g.shape or z.ndim != 1:
        raise ValueError(f"prompt_centred: margins and groups must be two (N,) arrays, got {z.shape} and {g.shape}")
    sums = np.bincount(g, weights=z)
    counts = np.bincount(g)
    return z - sums[g] / counts[g]


def global_mean(w: torch.Tensor, over_ranks: bool = True) -> torch.Tensor:
    """Mean of ``w`` over the entries of every rank, differentiable (an autograd-aware all-reduce
    sums the gradients of every rank's uses); the plain mean on one process or without ``over_ranks``."""
    if not over_ranks or world_size() == 1:
        return w.mean()
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private API without this autograd rule: same result
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated", category=FutureWarning)
        total = all_reduce(torch.stack([w.sum(), torch.tensor(float(w.numel()), dtype=w.dtype, device=w.device)]))
    return total[0] / total[1]
