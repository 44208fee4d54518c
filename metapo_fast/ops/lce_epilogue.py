"""The fused-loss epilogue: per-row log-sum-exp, target log-prob and full-vocabulary KL of a logits
chunk (forward), and the in-place softmax gradient scaled by each row's coefficient (backward).

The GEMMs stay in torch.matmul; the epilogue is everything done per row of a logits chunk. Three
implementations must agree: the PyTorch references below (``lce_epilogue_forward_ref``,
``lce_epilogue_backward_ref_``: the definitions), the Triton kernels (``kernels/lce_epilogue.py``,
GPU) and the C++ ops (``csrc/lce_epilogue.cpp``, CPU). Inputs are validated here, once, for all of
them; :func:`lce_epilogue_forward` / :func:`lce_epilogue_backward_` dispatch (``ops.dispatch``).

:func:`lce_epilogue_forward_into` is the forward the fused loss calls: it writes the per-row
statistics into columns of the caller's buffer (no per-chunk outputs to gather) and, with
``grad=True``, overwrites the logits with the backward for coefficient 1 in the same call (the
streamed-pair blocks, whose coefficients are applied later).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .dispatch import resolve_backend

__all__ = ["check_label_values", "compute_dtype", "lce_epilogue_forward", "lce_epilogue_backward_", "lce_epilogue_forward_ref",
           "lce_epilogue_backward_ref_", "lce_epilogue_forward_into", "lce_epilogue_forward_into_ref"]

_OP = "lce_epilogue"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else reduces in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The definitions (PyTorch references); rows are whatever the caller passes (on CPU the fused loss
# drops ignore_index rows before the GEMM, on CUDA it keeps them with a zero coefficient).
def lce_epilogue_forward_ref(
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


def lce_epilogue_backward_ref_(
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


def lce_epilogue_forward_into_ref(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor],
                                  stats: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """The forward of :func:`lce_epilogue_forward_ref` written into ``stats`` (``(n, K)``, compute
    dtype): column 0 <- logp and, with ``ref_logits``, 1 <- ref_logp, 2 <- kl; other columns are left
    as they are. ``grad``: then ``logits`` <- ``onehot - softmax`` in place (the backward with
    coefficient 1). Returns ``lse``."""
    lse, logp, ref_logp, kl = lce_epilogue_forward_ref(logits, targets, ref_logits)
    stats[:, 0] = logp
    if ref_logits is not None:
        stats[:, 1] = ref_logp
        stats[:, 2] = kl
    if grad:
        lce_epilogue_backward_ref_(logits, lse, targets, torch.ones_like(lse))
    return lse


def check_label_values(labels: torch.Tensor, v: int, ignore_index: int, host: Optional[np.ndarray] = None) -> None:
    """Every label is ``ignore_index`` or in ``[0, V)`` (CPU tensors: the C++ epilogue indexes with them).
    ``host``: ``labels`` as a NumPy array already, same shape (CPU labels: checked there, no tensor op)."""
    if host is not None or labels.device.type == "cpu":  # host data: read in NumPy
        arr = labels.detach().numpy() if host is None else host
        bad = np.argwhere((arr != ignore_index) & ((arr < 0) | (arr >= v)))
    else:
        bad = ((labels != ignore_index) & ((labels < 0) | (labels >= v))).nonzero()
    if len(bad):
        idx = [int(i) for i in bad[0]]
        value = int(arr[tuple(idx)]) if host is not None or labels.device.type == "cpu" else int(labels[tuple(idx)])
        raise ValueError(f"labels[{', '.join(map(str, idx))}] = {value} is outside [0, V={v}) and is not "
                         f"ignore_index={ignore_index}")


def _check(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor] = None,
           validate: bool = True) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{_OP}: logits must be 2-D (n, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{_OP}: logits must be floating point, got {logits.dtype}")
    n, v = logits.shape
    if targets.shape != (n,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{_OP}: targets must be an int64/int32 tensor of shape ({n},), got {tuple(targets.shape)} {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"{_OP}: targets is on {targets.device} but logits is on {logits.device}")
    if ref_logits is not None and (ref_logits.shape != logits.shape or ref_logits.device != logits.device):
        raise ValueError(f"{_OP}: ref_logits must match logits {tuple(logits.shape)} on {logits.device}, "
                         f"got {tuple(ref_logits.shape)} on {ref_logits.device}")
    # CUDA: would cost a host sync. validate=False: the caller checked the targets once (the fused
    # loss checks its labels before the first chunk), so the chunks do not re-scan them.
    if validate and logits.device.type == "cpu" and n and not torch.compiler.is_compiling():
        bad = ((targets < 0) | (targets >= v)).nonzero()
        if bad.numel():
            r = int(bad[0, 0])
            raise ValueError(f"{_OP}: targets[{r}] = {int(targets[r])} is outside [0, V={v})")


def lce_epilogue_forward(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor] = None, *,
                     backend: str = "auto", validate: bool = True):
    """``(lse, logp, ref_logp, kl)`` per row (float32; float64 for float64 input); without
    ``ref_logits`` the last two are empty. See :func:`lce_epilogue_forward_ref`. ``validate=False``
    skips the scan of the targets' values on CPU (for callers that validated them once)."""
    _check(logits, targets, ref_logits, validate)
    impl = resolve_backend(backend, logits.device, _OP)
    if impl == "triton":
        from ..kernels.lce_epilogue import lce_epilogue_forward_triton

        return lce_epilogue_forward_triton(logits, targets, ref_logits)
    if impl == "cpp":
        return torch.ops.metapo_fast_cpp.lce_epilogue_fwd(logits, targets, ref_logits)
    return lce_epilogue_forward_ref(logits, targets, ref_logits)


def lce_epilogue_forward_into(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor],
                              stats: torch.Tensor, *, grad: bool = False, backend: str = "auto",
                              validate: bool = True) -> torch.Tensor:
    """:func:`lce_epilogue_forward` writing ``logp`` (and ``ref_logp``, ``kl`` with ``ref_logits``)
    into columns 0 (1, 2) of ``stats``, an ``(n, K)`` tensor of the compute dtype with unit column
    stride (any row stride: a block of the fused loss's row buffer); returns ``lse``. ``grad=True``
    then overwrites ``logits`` in place with ``onehot - softmax`` (coefficient 1), in the same call.
    See :func:`lce_epilogue_forward_into_ref`."""
    _check(logits, targets, ref_logits, validate)
    n, cols = logits.shape[0], 1 if ref_logits is None else 3
    cd = compute_dtype(logits.dtype)
    if (stats.dim() != 2 or stats.shape[0] != n or stats.shape[1] < cols or stats.dtype != cd
            or stats.device != logits.device or (stats.shape[1] > 1 and stats.stride(1) != 1)):
        raise ValueError(f"{_OP}: stats must be a ({n}, >={cols}) {cd} tensor on {logits.device} with unit column stride, "
                         f"got {tuple(stats.shape)} {stats.dtype} on {stats.device} with strides {stats.stride()}")
    impl = resolve_backend(backend, logits.device, _OP)
    if impl == "triton":
        from ..kernels.lce_epilogue import lce_epilogue_forward_into_triton

        return lce_epilogue_forward_into_triton(logits, targets, ref_logits, stats, grad)
    if impl == "cpp":
        return torch.ops.metapo_fast_cpp.lce_epilogue_fwd_into(logits, targets, ref_logits, stats, grad)
    return lce_epilogue_forward_into_ref(logits, targets, ref_logits, stats, grad)


def lce_epilogue_backward_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, *,
                       backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """In place: ``logits[r] <- coef[r] * (onehot(targets[r]) - softmax(logits[r]))``. Returns ``logits``."""
    _check(logits, targets, validate=validate)
    n = logits.shape[0]
    for name, x in (("lse", lse), ("coef", coef)):
        if x.shape != (n,) or x.device != logits.device:
            raise ValueError(f"{_OP}: {name} must have shape ({n},) on {logits.device}, got {tuple(x.shape)} on {x.device}")
    impl = resolve_backend(backend, logits.device, _OP)
    if impl == "triton":
        from ..kernels.lce_epilogue import lce_epilogue_backward_triton_

        lce_epilogue_backward_triton_(logits, lse, targets, coef)
        return logits
    if impl == "cpp":
        torch.ops.metapo_fast_cpp.lce_epilogue_bwd_(logits, lse, targets, coef)
        return logits
    return lce_epilogue_backward_ref_(logits, lse, targets, coef)
