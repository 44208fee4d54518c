"""Pairwise preference losses (docs/math.md section 2), in a small registry: name -> function.

A loss function maps per-sequence statistics of a batch of pairs to ``(per_pair_loss, logit)``,
both of shape ``(B,)``:

* ``per_pair_loss`` is ``l_i``; the batch loss is ``L = (1/B) sum_i w_i l_i`` with detached weights;
* ``logit`` is the quantity whose sigmoid is the preference probability: the DPO margin
  ``z_i = beta * (lr(y_w) - lr(y_l))`` for losses with a reference, the loss's own logit for
  reference-free ones (SimPO, ORPO). It is the tracker's margin feature f1 and TRL's
  ``rewards/margins`` for DPO.

Every loss is a function of per-sequence sums of log-probs and token counts only, which is what
lets the fused kernel turn its gradient into one coefficient per sequence (see
``ops/preference_loss.py``). Adding a loss is one function and one ``@register_loss`` line; a loss
of the DPO margin alone is registered as ``l(z, params)`` with ``@register_margin_loss`` (sigmoid,
robust, focal), which builds the batch function from it, so the fused op can evaluate ``l`` on its
margins directly.

Each built-in loss also registers the closed form of its derivative, which the fused op uses per
chunk instead of autograd (a handful of ops on ``(n,)`` tensors):

* ``logit_grad(z, params) -> dl/dz`` for losses that are a function of the DPO margin
  ``z = beta (lr(y_w) - lr(y_l))`` alone (sigmoid, robust, focal): then
  ``dl/dlogp_w = beta dl/dz`` and ``dl/dlogp_l = -beta dl/dz``;
* ``grad(batch, params) -> (dl/dlogp_w, dl/dlogp_l)`` for the others (ipo, simpo, orpo).

A loss registered without either (e.g. the meta-objective losses of ``metapo/bilevel.py``) is
differentiated by autograd on the same small tensors; ``tests/test_losses.py`` checks every closed
form against autograd in float64.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["LossParams", "PairBatch", "LossSpec", "LOSSES", "register_loss", "register_margin_loss", "get_loss", "pair_loss",
           "sequence_coefficients"]


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the registered losses.

    Attributes:
        beta: DPO temperature (sigmoid, ipo, focal) / SimPO's reward scale.
        label_smoothing: eps of conservative DPO (``sigmoid`` only); 0 gives plain DPO.
        focal_gamma: exponent gamma of FocalPO's modulating factor ``p^gamma`` (paper Eq. 2).
        simpo_gamma: SimPO's target reward margin (TRL's ``simpo_gamma``; SimPO paper default 0.5).
        orpo_lambda: weight of ORPO's odds-ratio term (TRL's ORPO ``beta``).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    focal_gamma: float = 1.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    def __post_init__(self):
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"LossParams.beta must be a positive finite number, got {self.beta}")
        if not (0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"LossParams.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not self.focal_gamma >= 0:
            raise ValueError(f"LossParams.focal_gamma must be >= 0, got {self.focal_gamma}")
        if not self.orpo_lambda >= 0:
            raise ValueError(f"LossParams.orpo_lambda must be >= 0, got {self.orpo_lambda}")

    def kwargs(self) -> dict:
        """The fields as keyword arguments of :func:`metapo_fast.fused_linear_preference_loss`."""
        return dataclasses.asdict(self)


@dataclass
class PairBatch:
    """Per-sequence sums for B pairs (all shape ``(B,)``).

    ``*_logps`` are sums of response-token log-probs; ``*_counts`` are response-token counts;
    reference sums are None for reference-free use. Average log-probs divide by ``max(count, 1)``,
    so a fully masked response has sum 0, average 0 and a finite loss.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen_logps / self.chosen_counts.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected_logps / self.rejected_counts.clamp(min=1)

    def _need_ref(self, loss: str) -> None:
        if self.ref_chosen_logps is None or self.ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss!r} needs reference log-probs (ref_hidden/ref_weight or ref_logps)")

    def logratios(self, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr(y) = logp_theta(y|x) - logp_ref(y|x)`` (sums) for chosen and rejected."""
        self._need_ref(loss)
        return self.chosen_logps - self.ref_chosen_logps, self.rejected_logps - self.ref_rejected_logps

    def avg_logratios(self, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._need_ref(loss)
        return (
            self.chosen_avg - self.ref_chosen_logps / self.chosen_counts.clamp(min=1),
            self.rejected_avg - self.ref_rejected_logps / self.rejected_counts.clamp(min=1),
        )


LossFn = Callable[[PairBatch, LossParams], tuple[torch.Tensor, torch.Tensor]]
GradFn = Callable[[PairBatch, LossParams], tuple[torch.Tensor, torch.Tensor]]
LogitGradFn = Callable[[torch.Tensor, LossParams], torch.Tensor]
LogitLossFn = Callable[[torch.Tensor, LossParams], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. ``grad``: closed-form ``(dl_i/dchosen_logps_i, dl_i/drejected_logps_i)``
    of the per-pair loss (unweighted); ``logit_grad``: closed-form ``dl/dz`` for a loss of the DPO
    margin alone (then ``grad`` is derived from it). Neither: autograd (:func:`sequence_coefficients`)."""

    name: str
    fn: LossFn
    needs_reference: bool
    doc: str
    grad: Optional[GradFn] = None
    logit_grad: Optional[LogitGradFn] = None
    logit_loss: Optional[LogitLossFn] = None  # l(z) for a loss of the DPO margin alone (fn is l(dpo_margin), z)

    @property
    def has_closed_form(self) -> bool:
        return self.grad is not None


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_reference: bool, grad: Optional[GradFn] = None,
                  logit_grad: Optional[LogitGradFn] = None):
    """Decorator: add a loss to the registry under ``name``, with the closed form of its derivative
    when there is one (``grad``, or ``logit_grad`` for a function of the DPO margin; see the module doc)."""
    if logit_grad is not None and grad is None:
        grad = _grad_from_logit(name, logit_grad)

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(name, fn, needs_reference, (fn.__doc__ or "").strip(), grad, logit_grad)
        return fn

    return deco


def register_margin_loss(name: str, *, logit_grad: LogitGradFn, doc: str):
    """Decorator for a loss of the DPO margin alone: ``l(z, params) -> (B,)`` with the closed form
    of ``dl/dz``. Registers ``fn(batch) = (l(dpo_margin(batch)), dpo_margin(batch))`` (the one
    definition, so the fused op can evaluate ``l`` on its margins directly)."""
    def deco(l: LogitLossFn) -> LogitLossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")

        def fn(batch: PairBatch, params: LossParams):
            z = dpo_margin(batch, params, name)
            return l(z, params), z

        fn.__doc__ = l.__doc__ = doc
        LOSSES[name] = LossSpec(name, fn, True, doc, _grad_from_logit(name, logit_grad), logit_grad, l)
        return l

    return deco


def _grad_from_logit(name: str, logit_grad: LogitGradFn) -> GradFn:
    def grad(batch: PairBatch, params: LossParams):
        d = params.beta * logit_grad(dpo_margin(batch, params, name), params)
        return d, -d

    return grad


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss_type {name!r}; registered: {sorted(LOSSES)}") from None


def dpo_margin(batch: PairBatch, params: LossParams, loss: str) -> torch.Tensor:
    """``z = beta * (lr(y_w) - lr(y_l))`` (math.md section 1)."""
    lr_w, lr_l = batch.logratios(loss)
    return params.beta * (lr_w - lr_l)


def _sigmoid_dz(z: torch.Tensor, p: LossParams) -> torch.Tensor:
    """d/dz of ``-(1-eps) log sigma(z) - eps log sigma(-z)`` = ``-(1-eps)(1 - sigma(z)) + eps sigma(z)``
    = ``eps - sigma(-z)`` (written so, it keeps full relative precision where sigma(z) rounds to 1)."""
    return p.label_smoothing - torch.sigmoid(-z)


def _robust_dz(z: torch.Tensor, p: LossParams) -> torch.Tensor:
    """d/dz of ``((1-eps) l(z) - eps l(-z)) / (1-2eps)``, l(z) = -log sigma(z):
    ``(-(1-eps)(1 - sigma(z)) - eps sigma(z)) / (1-2eps) = -sigma(-z) - eps/(1-2eps)``."""
    eps = p.label_smoothing
    return -eps / (1.0 - 2.0 * eps) - torch.sigmoid(-z)


def _focal_dz(z: torch.Tensor, p: LossParams) -> torch.Tensor:
    """d/dz of ``-p^g log p``, p = sigma(z), dp/dz = p (1-p): ``-p^g (1-p) (g log p + 1)``."""
    log_p = F.logsigmoid(z)
    return -torch.exp(p.focal_gamma * log_p) * torch.sigmoid(-z) * (p.focal_gamma * log_p + 1.0)


def _ipo_grad(batch: PairBatch, p: LossParams):
    """``l = (d - 1/(2 beta))^2``, ``d = lr_w / max(n_w, 1) - lr_l / max(n_l, 1)``:
    ``dl/dlogp_w = 2 (d - 1/(2 beta)) / max(n_w, 1)``, ``dl/dlogp_l = -2 (...) / max(n_l, 1)``."""
    a_w, a_l = batch.avg_logratios("ipo")
    r = 2.0 * ((a_w - a_l) - 1.0 / (2.0 * p.beta))
    return r / batch.chosen_counts.clamp(min=1), -r / batch.rejected_counts.clamp(min=1)


def _simpo_grad(batch: PairBatch, p: LossParams):
    """``l = -log sigma(z)``, ``z = beta (avg_w - avg_l) - gamma``: ``dl/dz = -sigma(-z)``, and
    ``dz/dlogp_w = beta / max(n_w, 1)``, ``dz/dlogp_l = -beta / max(n_l, 1)``."""
    z = p.beta * (batch.chosen_avg - batch.rejected_avg) - p.simpo_gamma
    d = -p.beta * torch.sigmoid(-z)
    return d / batch.chosen_counts.clamp(min=1), -d / batch.rejected_counts.clamp(min=1)


def _log_odds_grad(avg_logp: torch.Tensor) -> torch.Tensor:
    """d/da of :func:`_log_odds`: ``1 + e^a / (1 - e^a) = -1 / expm1(a)`` below the clamp, 0 above
    it (the clamp passes the gradient at equality, as torch.clamp's backward does)."""
    a = avg_logp.clamp(max=_ORPO_MAX_AVG_LOGP)
    return torch.where(avg_logp <= _ORPO_MAX_AVG_LOGP, -1.0 / torch.expm1(a), torch.zeros_like(a))


def _orpo_grad(batch: PairBatch, p: LossParams):
    """``l = -avg_w - lam log sigma(z)``, ``z = LO(avg_w) - LO(avg_l)``: ``dl/davg_w = -1 - lam
    sigma(-z) LO'(avg_w)``, ``dl/davg_l = lam sigma(-z) LO'(avg_l)``; ``davg/dlogp = 1/max(n, 1)``."""
    a_w, a_l = batch.chosen_avg, batch.rejected_avg
    z = _log_odds(a_w) - _log_odds(a_l)
    s = p.orpo_lambda * torch.sigmoid(-z)
    return ((-1.0 - s * _log_odds_grad(a_w)) / batch.chosen_counts.clamp(min=1),
            (s * _log_odds_grad(a_l)) / batch.rejected_counts.clamp(min=1))


@register_margin_loss("sigmoid", logit_grad=_sigmoid_dz,
                      doc="DPO: ``-(1-eps) log sigma(z) - eps log sigma(-z)``, z = beta (lr_w - lr_l) (Rafailov et al. 2023).")
def sigmoid_loss(z: torch.Tensor, params: LossParams) -> torch.Tensor:
    eps = params.label_smoothing
    loss = F.logsigmoid(z).mul(-(1 - eps))
    if eps:
        loss = loss - eps * F.logsigmoid(-z)
    return loss


@register_margin_loss("robust", logit_grad=_robust_dz,
                      doc="rDPO (Chowdhury et al. 2024; TRL's ``robust``): ``((1-eps) l(z) - eps l(-z)) / (1 - 2 eps)`` "
                          "with ``l(z) = -log sigma(z)`` and eps = ``label_smoothing``, the assumed flip rate: an unbiased "
                          "estimate of the clean-label DPO loss when each label is flipped with probability eps.")
def robust_loss(z: torch.Tensor, params: LossParams) -> torch.Tensor:
    eps = params.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register_loss("ipo", needs_reference=True, grad=_ipo_grad)
def ipo_loss(batch: PairBatch, params: LossParams):
    """IPO: ``((lr_avg(y_w) - lr_avg(y_l)) - 1/(2 beta))^2`` with average log-probs (Azar et al. 2024).

    The logit returned is the standard DPO margin (sums), like every reference-based loss.
    """
    a_w, a_l = batch.avg_logratios("ipo")
    loss = ((a_w - a_l) - 1.0 / (2.0 * params.beta)) ** 2
    return loss, dpo_margin(batch, params, "ipo")


@register_margin_loss("focal", logit_grad=_focal_dz,
                      doc="FocalPO (paper Eq. 2): ``-p^gamma log sigma(z)``, p = sigma(z); gradient through both factors.")
def focal_loss(z: torch.Tensor, params: LossParams) -> torch.Tensor:
    log_p = F.logsigmoid(z)
    return -torch.exp(params.focal_gamma * log_p) * log_p


@register_loss("simpo", needs_reference=False, grad=_simpo_grad)
def simpo_loss(batch: PairBatch, params: LossParams):
    """SimPO: ``-log sigma(beta (avg logp_w - avg logp_l) - gamma)`` (Meng et al. 2024); logit = the argument."""
    z = params.beta * (batch.chosen_avg - batch.rejected_avg) - params.simpo_gamma
    return -F.logsigmoid(z), z


# log p of a whole response is <= 0; an average of exactly 0 (fully masked or certain) would make
# log(1 - p) = -inf. Clamping the average at -1e-6 keeps the odds finite (|log odds| <= ~14).
_ORPO_MAX_AVG_LOGP = -1e-6


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``log p = avg_logp``; ``log(1 - p) = log(-expm1(avg_logp))``."""
    a = avg_logp.clamp(max=_ORPO_MAX_AVG_LOGP)
    return a - torch.log(-torch.expm1(a))


@register_loss("orpo", needs_reference=False, grad=_orpo_grad)
def orpo_loss(batch: PairBatch, params: LossParams):
    """ORPO: ``NLL_avg(y_w) - lam log sigma(log odds(y_w) - log odds(y_l))`` (Hong et al. 2024).

    Odds from average log-probs; the logit is the log-odds ratio.
    """
    z = _log_odds(batch.chosen_avg) - _log_odds(batch.rejected_avg)
    return -batch.chosen_avg - params.orpo_lambda * F.logsigmoid(z), z


def pair_loss(
    batch: PairBatch,
    loss_type: str = "sigmoid",
    params: Optional[LossParams] = None,
    sample_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, l, z)``: weighted batch loss ``(1/B) sum_i w_i l_i`` (weights detached), per-pair losses, logits."""
    spec = get_loss(loss_type)
    params = params or LossParams()
    per_pair, logit = spec.fn(batch, params)
    if sample_weights is None:
        return per_pair.mean(), per_pair, logit
    w = sample_weights.detach().to(per_pair.dtype)
    if w.shape != per_pair.shape:
        raise ValueError(f"sample_weights must have shape {tuple(per_pair.shape)} (one per pair), got {tuple(w.shape)}")
    return (w * per_pair).sum() / per_pair.shape[0], per_pair, logit


def sequence_coefficients(spec: LossSpec, params: LossParams, logps: torch.Tensor, counts: torch.Tensor,
                          ref_logps: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                          denom: float = 1.0, need_grad: bool = True, closed_form: bool = True):
    """The loss of n pairs from their 2n per-sequence sums, and its gradient per sequence.

    ``logps``, ``counts``, ``ref_logps``: ``(2n,)``, the n chosen sequences then the n rejected.
    Returns ``(loss, per_pair, logit, coef)`` with ``loss = sum_i w_i l_i / denom`` (w = 1 without
    ``weights``) and ``coef = dloss/dlogps`` (None unless ``need_grad``), all detached. The gradient
    is the loss's closed form (``spec.grad``) when it has one and ``closed_form``; otherwise autograd
    on these small tensors (any registered loss works). This is what turns the fused loss's backward
    into one coefficient per sequence. Callers inside a custom op must restore the autograd dispatch
    keys before the autograd fallback.
    """
    n = logps.shape[0] // 2

    def batch_of(lp):
        return PairBatch(lp[:n], lp[n:], counts[:n], counts[n:],
                         None if ref_logps is None else ref_logps[:n], None if ref_logps is None else ref_logps[n:])

    def loss_of(lp):
        per_pair, logit = spec.fn(batch_of(lp), params)
        loss = (per_pair if weights is None else weights * per_pair).sum() / denom
        return loss, per_pair, logit

    if not need_grad or (closed_form and spec.grad is not None):
        loss, per_pair, logit = loss_of(logps.detach())
        coef = None
        if need_grad:
            d_w, d_l = spec.grad(batch_of(logps.detach()), params)
            if weights is not None:
                d_w, d_l = d_w * weights, d_l * weights
            coef = torch.cat([d_w, d_l]) / denom
        return loss, per_pair, logit, coef
    with torch.enable_grad():
        lp = logps.detach().requires_grad_()
        loss, per_pair, logit = loss_of(lp)
        (coef,) = torch.autograd.grad(loss, lp)
    return loss.detach(), per_pair.detach(), logit.detach(), coef
