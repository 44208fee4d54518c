"""The fused-loss epilogue: per-row log-sum-exp, target log-prob and full-vocabulary KL of a logits
chunk (forward), and the in-place softmax gradient scaled by each row's coefficient (backward).

Three implementations that must agree: the PyTorch reference (:mod:`metapo_fast.reference`), the
Triton kernels (``kernels/lce_epilogue.py``, GPU) and the C++ ops (``csrc/lce_epilogue.cpp``,
CPU). Validation happens here, once, for all of them.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backend import resolve_backend
from .reference import epilogue_backward_reference, epilogue_forward_reference

__all__ = ["epilogue_forward", "epilogue_backward_"]

_OP = "lce_epilogue"


def _check(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor] = None) -> None:
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
    if logits.device.type == "cpu" and n and not torch.compiler.is_compiling():  # CUDA: would cost a host sync
        bad = ((targets < 0) | (targets >= v)).nonzero()
        if bad.numel():
            r = int(bad[0, 0])
            raise ValueError(f"{_OP}: targets[{r}] = {int(targets[r])} is outside [0, V={v})")


def epilogue_forward(logits: torch.Tensor, targets: torch.Tensor, ref_logits: Optional[torch.Tensor] = None, *,
                     backend: str = "auto"):
    """``(lse, logp, ref_logp, kl)`` per row (float32; float64 for float64 input); without
    ``ref_logits`` the last two are empty. See :func:`metapo_fast.reference.epilogue_forward_reference`."""
    _check(logits, targets, ref_logits)
    impl = resolve_backend(backend, logits.device, _OP)
    if impl == "triton":
        from .kernels.lce_epilogue import lce_epilogue_forward_triton

        return lce_epilogue_forward_triton(logits, targets, ref_logits)
    if impl == "cpp":
        return torch.ops.metapo_fast_cpp.lce_epilogue_fwd(logits, targets, ref_logits)
    return epilogue_forward_reference(logits, targets, ref_logits)


def epilogue_backward_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, *,
                       backend: str = "auto") -> torch.Tensor:
    """In place: ``logits[r] <- coef[r] * (onehot(targets[r]) - softmax(logits[r]))``. Returns ``logits``."""
    _check(logits, targets)
    n = logits.shape[0]
    for name, x in (("lse", lse), ("coef", coef)):
        if x.shape != (n,) or x.device != logits.device:
            raise ValueError(f"{_OP}: {name} must have shape ({n},) on {logits.device}, got {tuple(x.shape)} on {x.device}")
    impl = resolve_backend(backend, logits.device, _OP)
    if impl == "triton":
        from .kernels.lce_epilogue import lce_epilogue_backward_triton_

        lce_epilogue_backward_triton_(logits, lse, targets, coef)
        return logits
    if impl == "cpp":
        torch.ops.metapo_fast_cpp.lce_epilogue_bwd_(logits, lse, targets, coef)
        return logits
    return epilogue_backward_reference(logits, lse, targets, coef)
