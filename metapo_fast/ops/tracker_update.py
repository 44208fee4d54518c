"""The tracker update op (docs/math.md section 3): for each visited pair, Welford's running mean and
M2 of its margin, and EMAs of margin, volatility and KL, in place in a ``(N, 6)`` float32 state.

``tracker_update_ref`` is the definition (a loop, one visit at a time). The op ``tracker_update``
(a ``torch.library`` custom op that mutates ``state``) dispatches to the Triton kernel
(``kernels/tracker.py``: one launch, no host sync), the C++ op (``csrc/tracker.cpp``) or the
vectorised PyTorch path here, which all agree with the reference, repeated ids included.
"""
from __future__ import annotations

import torch

from .dispatch import resolve_backend

__all__ = ["TRACKER_COLUMNS", "FEATURE_NAMES", "tracker_update", "tracker_update_ref", "tracker_update_torch_"]

# Column order of the tracker state, 6 float32 per pair (24 bytes; math.md section 3).
TRACKER_COLUMNS = ("ema_margin", "ema_std", "ema_kl", "mean", "m2", "count")
# Order of the feature vector s = [f1, ema1, f2, ema2, f3, ema3] (paper Eq. 9).
FEATURE_NAMES = ("margin", "ema_margin", "std", "ema_std", "kl", "ema_kl")


def tracker_update_ref(
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


def _update_unique(state: torch.Tensor, ids: torch.Tensor, f1: torch.Tensor, f3: torch.Tensor, alpha: float) -> torch.Tensor:
    e1, e2, e3, mean, m2, c = state[ids].unbind(1)
    first = c == 0
    n = c + 1
    d = f1 - mean
    mean_n = torch.where(first, f1, mean + d / n)
    m2_n = torch.where(first, torch.zeros_like(m2), m2 + d * (f1 - mean_n))
    f2 = torch.where(first, torch.zeros_like(m2), torch.sqrt(m2_n / n))
    e1_n = torch.where(first, f1, alpha * e1 + (1 - alpha) * f1)
    e2_n = torch.where(first, f2, alpha * e2 + (1 - alpha) * f2)
    e3_n = torch.where(first, f3, alpha * e3 + (1 - alpha) * f3)
    state[ids] = torch.stack([e1_n, e2_n, e3_n, mean_n, m2_n, n], 1)
    return torch.stack([f1, e1_n, f2, e2_n, f3, e3_n], 1)


def tracker_update_torch_(state, ids, margins, kl, alpha: float) -> torch.Tensor:
    """Vectorised PyTorch update. Repeated ids are applied in rounds (k-th occurrences in round k),
    which equals sequential application; the number of rounds is read on the host (a sync on CUDA,
    where the Triton kernel is the default)."""
    ids = ids.long()
    f1, f3 = margins.to(state.dtype), kl.to(state.dtype)
    eq = ids.unsqueeze(0) == ids.unsqueeze(1)
    occurrence = torch.tril(eq, diagonal=-1).sum(1)  # earlier positions holding the same id
    out = state.new_empty(ids.shape[0], 6)
    rounds = int(occurrence.max()) + 1 if ids.numel() else 0
    for k in range(rounds):
        sel = (occurrence == k).nonzero().squeeze(1) if rounds > 1 else slice(None)
        out[sel] = _update_unique(state, ids[sel], f1[sel], f3[sel], alpha)
    return out


@torch.library.custom_op("metapo_fast::tracker_update", mutates_args=("state",))
def tracker_update(state: torch.Tensor, ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor, alpha: float,
                backend: str) -> torch.Tensor:
    impl = resolve_backend(backend, state.device, "tracker_update")
    if impl == "triton":
        from ..kernels.tracker import tracker_update_triton_

        return tracker_update_triton_(state, ids, margins, kl, alpha)
    if impl == "cpp":
        return torch.ops.metapo_fast_cpp.tracker_update_(state, ids, margins, kl, alpha)
    return tracker_update_torch_(state, ids, margins, kl, alpha)


@tracker_update.register_fake
def _tracker_fake(state, ids, margins, kl, alpha, backend):
    return state.new_empty(ids.shape[0], 6)
