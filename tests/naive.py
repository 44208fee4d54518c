"""Naive full-logits implementations of docs/math.md section 1, the float64 yardstick the tests (and
the "naive" benchmark baseline) compare the fused op against. They materialise ``[2B, T, V]``.

Layout convention (TRL / Liger-Kernel): hidden states ``(2B, T, H)`` with the B chosen rows first
and the B rejected rows second; ``labels (2B, T)`` already shifted, so ``hidden[:, t]`` predicts
``labels[:, t]``; prompt and padding positions hold ``ignore_index``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from metapo_fast.ops.lce_epilogue import compute_dtype

__all__ = ["linear_logits", "token_logps", "token_kl", "SequenceLogps", "sequence_logps"]


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in the input dtype, shape ``(..., V)``."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits


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
