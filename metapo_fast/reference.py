"""Plain PyTorch reference of every definition in docs/math.md (sections 1 and 3).

This module is the single source of truth for the math: the Triton kernels (`kernels/`) and the
C++ ops (`csrc/`) are tested against these functions, and these functions are tested against
hand-worked values and float64 NumPy. Everything here runs in float64 when given float64 inputs;
half-precision inputs are upcast to float32 before any reduction.

Layout convention (TRL / Liger-Kernel): hidden states ``(2B, T, H)`` with the B chosen rows first
and the B rejected rows second; ``labels (2B, T)`` already shifted, so ``hidden[:, t]`` predicts
``labels[:, t]``; prompt and padding positions hold ``ignore_index``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "TRACKER_COLUMNS",
    "FEATURE_NAMES",
    "SequenceLogps",
    "compute_dtype",
    "linear_logits",
    "epilogue_forward_reference",
    "epilogue_backward_reference",
    "token_logps",
    "token_kl",
    "sequence_logps",
    "tracker_update_reference",
]

# Column order of the tracker state, 6 float32 per pair (24 bytes; math.md section 3).
TRACKER_COLUMNS = ("ema_margin", "ema_std", "ema_kl", "mean", "m2", "count")
# Order of the feature vector s = [f1, ema1, f2, ema2, f3, ema3] (paper Eq. 9).
FEATURE_NAMES = ("margin", "ema_margin", "std", "ema_std", "kl", "ema_kl")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else reduces in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in the input dtype, shape ``(..., V)``."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits


# ---------------------------------------------------------------------------------------------
# Epilogue contract shared by the three implementations (PyTorch here, Triton in
# kernels/lce_epilogue.py, C++ in csrc/lce_epilogue.cpp). The GEMMs stay in torch.matmul; the
# epilogue is everything done per row of a logits chunk. Rows are valid tokens only (the caller
# gathers away ignore_index positions before the GEMM).
# ---------------------------------------------------------------------------------------------
def epilogue_forward_reference(
    logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row statistics of a logits chunk.

    Args:
        logits: ``(n, V)`` policy logits, any float dtype.
        targets: ``(n,)`` int64 target ids in ``[0, V)``.
        ref_logits: optional ``(n, V)`` reference logits.

    Returns ``(lse, logp, ref_logp, kl)``, each ``(n,)`` in float32 (float64 for float64 input):
        ``lse = logsumexp_v x_v``; ``logp = x_t - lse``;
        ``ref_logp = y_t - logsumexp_v y_v``;
        ``kl = sum_v softmax(x)_v (log_softmax(x)_v - log_softmax(y)_v)``.
    Without ``ref_logits`` the last two are empty tensors of shape ``(0,)``.
    """
    cd = compute_dtype(logits.dtype)
    x = logits.to(cd)
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    if ref_logits is None:
        empty = x.new_empty(0)
        return lse, logp, empty, empty
    y = ref_logits.to(cd)
    ref_log_softmax = torch.log_softmax(y, dim=-1)
    ref_logp = ref_log_softmax.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    log_softmax = x - lse.unsqueeze(-1)
    kl = (log_softmax.exp() * (log_softmax - ref_log_softmax)).sum(-1)
    return lse, logp, ref_logp, kl


def epilogue_backward_reference(
    logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Gradient of ``sum_r coef_r * logp_r`` with respect to the logits, written IN PLACE.

    ``logits[r, v] <- coef[r] * (1[v == targets[r]] - exp(logits[r, v] - lse[r]))``, stored in the
    logits dtype (computed in float32, or float64 for float64 input). Returns ``logits``.
    """
    cd = compute_dtype(logits.dtype)
    grad = -torch.exp(logits.to(cd) - lse.to(cd).unsqueeze(-1))
    grad.scatter_add_(-1, targets.long().unsqueeze(-1), torch.ones_like(lse, dtype=cd).unsqueeze(-1))
    grad.mul_(coef.to(cd).unsqueeze(-1))
    logits.copy_(grad)
    return logits


# ---------------------------------------------------------------------------------------------
# Naive full-logits reference (math.md section 1). Materialises [2B, T, V]: only for tests and
# the "naive" benchmark baseline.
# ---------------------------------------------------------------------------------------------
def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log pi(label_t | ctx_t)`` of shape ``labels.shape`` (0 where masked), and the mask."""
    cd = compute_dtype(hidden.dtype)
    logits = linear_logits(hidden, weight, bias).to(cd)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary ``KL(pi_theta || pi_ref)`` per position, shape ``logits.shape[:-1]``."""
    cd = compute_dtype(policy_logits.dtype)
    lp = torch.log_softmax(policy_logits.to(cd), dim=-1)
    lq = torch.log_softmax(ref_logits.to(cd), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@dataclass
class SequenceLogps:
    """Per-sequence sums over response tokens, for the 2B rows (chosen first).

    ``logps``: policy ``sum_t log pi``; ``counts``: number of response tokens (float);
    ``ref_logps``: reference sums or None; ``kl_sum``: sum over tokens of the token KL or None.
    """

    logps: torch.Tensor
    counts: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None
    kl_sum: Optional[torch.Tensor] = None


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    compute_kl: bool = True,
) -> SequenceLogps:
    """Naive per-sequence log-probs (and reference log-probs, token-KL sums) from hidden states.

    Differentiable with respect to the policy inputs; reference quantities and the KL are detached.
    """
    cd = compute_dtype(hidden.dtype)
    logits = linear_logits(hidden, weight, bias).to(cd)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    log_softmax = torch.log_softmax(logits, dim=-1)
    logps = (log_softmax.gather(-1, safe).squeeze(-1) * mask).sum(-1)
    counts = mask.sum(-1).to(cd)
    ref_logps = kl_sum = None
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("sequence_logps: ref_hidden was given without ref_weight")
        with torch.no_grad():
            ref_ls = torch.log_softmax(linear_logits(ref_hidden, ref_weight, ref_bias).to(cd), dim=-1)
            ref_logps = (ref_ls.gather(-1, safe).squeeze(-1) * mask).sum(-1)
            if compute_kl:
                ls = log_softmax.detach()
                kl_sum = ((ls.exp() * (ls - ref_ls)).sum(-1) * mask).sum(-1)
    return SequenceLogps(logps=logps, counts=counts, ref_logps=ref_logps, kl_sum=kl_sum)


# ---------------------------------------------------------------------------------------------
# Temporal tracker (math.md section 3): state columns TRACKER_COLUMNS, features FEATURE_NAMES.
# ---------------------------------------------------------------------------------------------
def tracker_update_reference(
    state: torch.Tensor, ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Update ``state (N, 6)`` in place for the pairs ``ids (B,)``; return features ``(B, 6)``.

    Per visit of pair i with margin f1 and KL f3 (Welford with the true running mean; EMAs start
    at the first observed value)::

        first visit (count == 0): mean = f1, M2 = 0, count = 1, f2 = 0,
                                  ema1 = f1, ema2 = 0, ema3 = f3
        later:  count += 1; d = f1 - mean; mean += d / count; M2 += d * (f1 - mean)
                f2 = sqrt(M2 / count)
                ema_k = alpha * ema_k + (1 - alpha) * f_k        (k = 1, 2, 3)
        features = [f1, ema1, f2, ema2, f3, ema3]   (after this visit's update)

    Repeated ids within one call are applied sequentially in the order given, exactly as if
    each occurrence were its own call; each occurrence's row of the output holds the features
    after its own visit. Arithmetic is done in the state's dtype.
    """
    if state.dim() != 2 or state.shape[1] != 6:
        raise ValueError(f"tracker state must have shape (N, 6), got {tuple(state.shape)}")
    out = state.new_empty(ids.shape[0], 6)
    dt = state.dtype
    a = torch.tensor(alpha, dtype=dt)
    for j in range(ids.shape[0]):
        i = int(ids[j])
        f1 = margins[j].to(dt)
        f3 = kl[j].to(dt)
        ema1, ema2, ema3, mean, m2, count = state[i].unbind()
        if float(count) == 0.0:
            count = torch.ones((), dtype=dt)
            mean, m2 = f1, torch.zeros((), dtype=dt)
            f2 = torch.zeros((), dtype=dt)
            ema1, ema2, ema3 = f1, f2, f3
        else:
            count = count + 1
            d = f1 - mean
            mean = mean + d / count
            m2 = m2 + d * (f1 - mean)
            f2 = torch.sqrt(m2 / count)
            ema1 = a * ema1 + (1 - a) * f1
            ema2 = a * ema2 + (1 - a) * f2
            ema3 = a * ema3 + (1 - a) * f3
        state[i] = torch.stack([ema1, ema2, ema3, mean, m2, count])
        out[j] = torch.stack([f1, ema1, f2, ema2, f3, ema3])
    return out
