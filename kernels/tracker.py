"""Triton kernel of the temporal tracker (GPU): one launch, state updated in place, no host sync.
Math and reference: metapo_fast.ops.tracker_update.tracker_update_ref; C++ twin: csrc/tracker.cpp.

One program per batch position j. Duplicate ids keep the sequential semantics deterministically:
a program whose id occurs earlier in the batch does nothing; the program of the first occurrence
applies every occurrence of its id in batch order and writes each occurrence's features. The
duplicate test is one vectorised compare over the id block, so a batch of unique ids does O(B)
work per program with no loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BATCH = 16384  # ids per update (all ranks together); larger batches are split by the caller


def _block(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _warps(block: int) -> int:
    # The id block is held in registers for the duplicate test: 1 warp up to 256 ids, then enough
    # warps to keep it at <= 32 int64 per thread (tools/sm90_check.py: 4096 ids on 1 warp spilled, 255 registers).
    return 1 if block <= 256 else max(4, block // 512)


@triton.jit
def _visit(S, F, row, j, f1, f3, alpha):
    """Apply one visit (margin f1, KL f3) to state row ``row``; write features row ``j``."""
    base = S + row * 6
    e1 = tl.load(base + 0)
    e2 = tl.load(base + 1)
    e3 = tl.load(base + 2)
    mean = tl.load(base + 3)
    m2 = tl.load(base + 4)
    c = tl.load(base + 5)
    first = c == 0.0
    n = c + 1.0
    d = f1 - mean
    mean_n = tl.where(first, f1, mean + d / n)
    m2_n = tl.where(first, 0.0, m2 + d * (f1 - mean_n))
    f2 = tl.where(first, 0.0, tl.sqrt(m2_n / n))
    e1_n = tl.where(first, f1, alpha * e1 + (1.0 - alpha) * f1)
    e2_n = tl.where(first, f2, alpha * e2 + (1.0 - alpha) * f2)
    e3_n = tl.where(first, f3, alpha * e3 + (1.0 - alpha) * f3)
    tl.store(base + 0, e1_n)
    tl.store(base + 1, e2_n)
    tl.store(base + 2, e3_n)
    tl.store(base + 3, mean_n)
    tl.store(base + 4, m2_n)
    tl.store(base + 5, n)
    out = F + j * 6
    tl.store(out + 0, f1)
    tl.store(out + 1, e1_n)
    tl.store(out + 2, f2)
    tl.store(out + 3, e2_n)
    tl.store(out + 4, f3)
    tl.store(out + 5, e3_n)


@triton.jit
def _tracker_update_kernel(S, IDS, M, K, F, B, alpha, BLOCK_B: tl.constexpr):
    j = tl.program_id(0)
    offs = tl.arange(0, BLOCK_B)
    ids = tl.load(IDS + offs, mask=offs < B, other=-1)
    my = tl.load(IDS + j)
    earlier = tl.sum(tl.where((offs < j) & (ids == my), 1, 0), 0)
    later = tl.sum(tl.where((offs > j) & (offs < B) & (ids == my), 1, 0), 0)
    if earlier == 0:
        if later == 0:
            _visit(S, F, my, j, tl.load(M + j), tl.load(K + j), alpha)
        else:
            for k in range(j, B):
                if tl.load(IDS + k) == my:
                    _visit(S, F, my, k, tl.load(M + k), tl.load(K + k), alpha)


def tracker_update_triton_(state: torch.Tensor, ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor,
                           alpha: float) -> torch.Tensor:
    """Update ``state (N, 6) float32`` in place for ``ids (B,)``; return features ``(B, 6)``."""
    if state.dtype != torch.float32 or state.dim() != 2 or state.shape[1] != 6 or not state.is_contiguous():
        raise ValueError(f"tracker (Triton): state must be a contiguous (N, 6) float32 tensor, got {tuple(state.shape)} {state.dtype}")
    b = ids.shape[0]
    if b > MAX_BATCH:
        raise ValueError(f"tracker (Triton): at most {MAX_BATCH} ids per update, got {b}; split the batch")
    feats = torch.empty(b, 6, dtype=torch.float32, device=state.device)
    if b == 0:
        return feats
    blk = _block(b)
    _tracker_update_kernel[(b,)](state, ids.long().contiguous(), margins.float().contiguous(), kl.float().contiguous(), feats,
                                 b, float(alpha), BLOCK_B=blk, num_warps=_warps(blk))
    return feats


SM90_CONFIGS = [
    {"name": f"tracker_B{blk}", "fn": _tracker_update_kernel,
     "signature": {"S": "*fp32", "IDS": "*i64", "M": "*fp32", "K": "*fp32", "F": "*fp32", "B": "i32", "alpha": "fp32",
                   "BLOCK_B": "constexpr"},
     "constexprs": {"BLOCK_B": blk}, "num_warps": _warps(blk)}
    for blk in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
]
