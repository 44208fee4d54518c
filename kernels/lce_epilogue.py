"""Triton kernels of the fused-loss epilogue (GPU). Math and PyTorch reference:
metapo_fast.ops.lce_epilogue.lce_epilogue_forward_ref / lce_epilogue_backward_ref_; C++ twin:
csrc/lce_epilogue.cpp. Called through metapo_fast.ops.lce_epilogue, which validates the inputs.

forward: one program per row, one pass over the row's policy and reference logits in blocks of
BLOCK_V with online max / sum-exp rescaling, so each logit is read once (logp, ref_logp, kl go to
columns 0, 1, 2 of an output with row stride ``stride_o``; GRAD: a second pass then writes the
backward for coefficient 1 in place, for the fused loss's streamed blocks):
    s_x = sum exp(x - m_x), s_y = sum exp(y - m_y), s_xy = sum exp(x - m_x) (x - y)
    lse = m_x + log s_x,  KL = s_xy / s_x - lse + (m_y + log s_y)
backward (in place): grid (row, block); g = coef_r (1[v == t_r] - exp(x - lse_r)), fp32 math,
stored in the logits dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 4096 fp32 lanes per block: 16 KB of bf16 per operand per iteration; with 8 warps that is 16
# elements per thread per operand, enough 16-byte loads in flight to stream HBM, few registers.
BLOCK_V_FWD = 4096
BLOCK_V_BWD = 4096
NUM_WARPS = 8
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _lce_epilogue_fwd_kernel(X, Y, T, LSE, OUT, stride_x, stride_y, stride_o, V,
                             HAS_REF: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    my = tl.full((), float("-inf"), tl.float32)
    sy = tl.zeros((), tl.float32)
    sxy = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        ex = tl.exp(x - m_new)
        s = s * alpha + tl.sum(ex, 0)
        if HAS_REF:
            y = tl.load(Y + row * stride_y + offs, mask=mask, other=float("-inf")).to(tl.float32)
            my_new = tl.maximum(my, tl.max(y, 0))
            sy = sy * tl.exp(my - my_new) + tl.sum(tl.exp(y - my_new), 0)
            sxy = sxy * alpha + tl.sum(tl.where(mask, ex * (x - y), 0.0), 0)
            my = my_new
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(T + row)
    o_row = OUT + row * stride_o
    tl.store(LSE + row, lse)
    tl.store(o_row, tl.load(x_row + t).to(tl.float32) - lse)
    if HAS_REF:
        lse_y = my + tl.log(sy)
        tl.store(o_row + 1, tl.load(Y + row * stride_y + t).to(tl.float32) - lse_y)
        tl.store(o_row + 2, sxy / s - lse + lse_y)
    if GRAD:  # the backward for coefficient 1, in place: a second pass over the row
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(offs == t, 1.0, 0.0) - tl.exp(x - lse)
            tl.store(x_row + offs, g.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _lce_epilogue_bwd_kernel(X, LSE, T, COEF, stride_x, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    ptr = X + row * stride_x + offs
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    c = tl.load(COEF + row)
    t = tl.load(T + row)
    g = c * (tl.where(offs == t, 1.0, 0.0) - tl.exp(x - lse))
    tl.store(ptr, g.to(X.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor) -> None:
    if logits.dtype not in _SUPPORTED:
        raise ValueError(f"lce_epilogue (Triton): logits dtype must be one of {_SUPPORTED}, got {logits.dtype}; "
                         "use backend='cpp' or 'torch' for float64")
    if logits.stride(1) != 1:
        raise ValueError(f"lce_epilogue (Triton): logits must be contiguous along V, got strides {logits.stride()}")


def _launch_fwd(logits, targets, ref_logits, out, grad: bool) -> torch.Tensor:
    _check(logits)
    n, v = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    has_ref = ref_logits is not None
    if has_ref:
        if ref_logits.dtype != logits.dtype:
            raise ValueError(f"lce_epilogue (Triton): ref_logits dtype {ref_logits.dtype} differs from logits dtype {logits.dtype}")
        _check(ref_logits)
    if out.dtype != torch.float32:
        raise ValueError(f"lce_epilogue (Triton): stats must be float32, got {out.dtype}")
    if n == 0:
        return lse
    y = ref_logits if has_ref else logits
    _lce_epilogue_fwd_kernel[(n,)](logits, y, targets if targets.dtype == torch.int64 else targets.long(), lse, out,
                                   logits.stride(0), y.stride(0), out.stride(0), v, HAS_REF=has_ref, GRAD=grad,
                                   BLOCK_V=BLOCK_V_FWD, num_warps=NUM_WARPS)
    return lse


def lce_epilogue_forward_triton(logits: torch.Tensor, targets: torch.Tensor, ref_logits=None):
    """``(lse, logp, ref_logp, kl)`` float32 ``(n,)``; the last two empty without ``ref_logits``
    (columns of one ``(n, 3)`` output; ``(n, 1)`` without reference)."""
    n, has_ref = logits.shape[0], ref_logits is not None
    out = torch.empty(n, 3 if has_ref else 1, dtype=torch.float32, device=logits.device)
    lse = _launch_fwd(logits, targets, ref_logits, out, False)
    if has_ref:
        return (lse, *out.unbind(1))
    empty = torch.empty(0, dtype=torch.float32, device=logits.device)
    return lse, out.view(n), empty, empty


def lce_epilogue_forward_into_triton(logits: torch.Tensor, targets: torch.Tensor, ref_logits, stats: torch.Tensor,
                                     grad: bool = False) -> torch.Tensor:
    """logp (ref_logp, kl) into columns 0 (1, 2) of ``stats``; ``grad``: then the logits <- onehot -
    softmax in place. Returns ``lse``."""
    return _launch_fwd(logits, targets, ref_logits, stats, grad)


def lce_epilogue_backward_triton_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor):
    """In place: ``logits <- coef * (onehot - softmax)``."""
    _check(logits)
    n, v = logits.shape
    if n == 0:
        return logits
    grid = (n, triton.cdiv(v, BLOCK_V_BWD))
    _lce_epilogue_bwd_kernel[grid](logits, lse.float().contiguous(), targets.long(), coef.float().contiguous(),
                                   logits.stride(0), v, BLOCK_V=BLOCK_V_BWD, num_warps=NUM_WARPS)
    return logits


_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Every configuration the launchers above can use, for the sm_90 compile-and-spill check
# (python -m tools.sm90_check).
SM90_CONFIGS = [
    *({"name": f"lce_fwd_{_TY[dt]}_{'ref' if ref else 'noref'}{'_grad' if grad else ''}", "fn": _lce_epilogue_fwd_kernel,
       "signature": {"X": f"*{_TY[dt]}", "Y": f"*{_TY[dt]}", "T": "*i64", "LSE": "*fp32", "OUT": "*fp32",
                     "stride_x": "i64", "stride_y": "i64", "stride_o": "i64", "V": "i32",
                     "HAS_REF": "constexpr", "GRAD": "constexpr", "BLOCK_V": "constexpr"},
       "constexprs": {"HAS_REF": ref, "GRAD": grad, "BLOCK_V": BLOCK_V_FWD}, "num_warps": NUM_WARPS}
      for dt in _SUPPORTED for ref in (True, False) for grad in (False, True)),
    *({"name": f"lce_bwd_{_TY[dt]}", "fn": _lce_epilogue_bwd_kernel,
       "signature": {"X": f"*{_TY[dt]}", "LSE": "*fp32", "T": "*i64", "COEF": "*fp32", "stride_x": "i64", "V": "i32",
                     "BLOCK_V": "constexpr"},
       "constexprs": {"BLOCK_V": BLOCK_V_BWD}, "num_warps": NUM_WARPS}
      for dt in _SUPPORTED),
]
