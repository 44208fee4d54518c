"""The temporal tracker: each training pair's history, 6 float32 (24 bytes) per pair on the device,
updated in place every time the pair is in a batch (paper Sec. 3.2 / Algorithm 2, with the
departures of docs/math.md section 3: Welford with the true running mean; EMAs start at the
first observed value).

State columns ``[ema_margin, ema_std, ema_kl, mean, m2, count]``; features returned by
:meth:`TemporalTracker.update` ``[f1, ema1, f2, ema2, f3, ema3]`` after this visit's update.
Implementations: Triton (``kernels/tracker.py``, one launch, no host sync), C++
(``csrc/tracker.cpp``) and the vectorised PyTorch path below, all checked against
:func:`metapo_fast.reference.tracker_update_reference`. Repeated ids within one update are applied
sequentially in the order given.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import resolve_backend
from .reference import TRACKER_COLUMNS

__all__ = ["TemporalTracker", "tracker_update_torch_"]

BYTES_PER_PAIR = 4 * len(TRACKER_COLUMNS)


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
def _tracker_op(state: torch.Tensor, ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor, alpha: float,
                backend: str) -> torch.Tensor:
    impl = resolve_backend(backend, state.device, "tracker_update")
    if impl == "triton":
        from .kernels.tracker import tracker_update_triton_

        return tracker_update_triton_(state, ids, margins, kl, alpha)
    if impl == "cpp":
        return torch.ops.metapo_fast_cpp.tracker_update_(state, ids, margins, kl, alpha)
    return tracker_update_torch_(state, ids, margins, kl, alpha)


@_tracker_op.register_fake
def _tracker_fake(state, ids, margins, kl, alpha, backend):
    return state.new_empty(ids.shape[0], 6)


class TemporalTracker:
    """Per-pair training history on the device (24 bytes per pair; the paper needs 40).

    Args:
        num_pairs: rows (pair ids are ``0 .. num_pairs-1``: a pair's index in the training set,
            stable across epochs, ranks and resumes; docs/math.md section 7).
        alpha: EMA decay in (0, 1) (paper: 0.9).
        device: where the state lives (the training device).
        backend: ``auto`` (Triton on CUDA, C++ on CPU), ``triton``, ``cpp`` or ``torch``.
        sync: with several ranks, all-gather (ids, margins, kl) every update so that every rank
            applies the same update and holds an identical replica. Every rank must pass the same
            number of pairs per update (the trainer's sampler guarantees it).
    """

    def __init__(self, num_pairs: int, alpha: float = 0.9, device=None, backend: str = "auto", sync: bool = True):
        if num_pairs < 1:
            raise ValueError(f"TemporalTracker: num_pairs must be >= 1, got {num_pairs}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"TemporalTracker: alpha must be in (0, 1), got {alpha}")
        self.num_pairs, self.alpha, self.backend, self.sync = int(num_pairs), float(alpha), backend, sync
        self.state = torch.zeros(self.num_pairs, len(TRACKER_COLUMNS), dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.state.device

    bytes_per_pair = BYTES_PER_PAIR

    @property
    def nbytes(self) -> int:
        return self.state.numel() * self.state.element_size()

    def _check(self, ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor) -> None:
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TemporalTracker.update: pair_ids must be a 1-D int64/int32 tensor, got {tuple(ids.shape)} {ids.dtype}")
        for name, x in (("margins", margins), ("kl", kl)):
            if x.shape != ids.shape:
                raise ValueError(f"TemporalTracker.update: {name} must have shape {tuple(ids.shape)} like pair_ids, got {tuple(x.shape)}")
            if x.device != self.device:
                raise ValueError(f"TemporalTracker.update: {name} is on {x.device}, the tracker on {self.device}")
        if ids.device != self.device:
            raise ValueError(f"TemporalTracker.update: pair_ids is on {ids.device}, the tracker on {self.device}")
        if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():  # CUDA: no host sync
            bad = ((ids < 0) | (ids >= self.num_pairs)).nonzero()
            if bad.numel():
                j = int(bad[0, 0])
                raise ValueError(f"TemporalTracker.update: pair_ids[{j}] = {int(ids[j])} is outside [0, {self.num_pairs})")

    def update(self, pair_ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """Update the pairs in place; return their features ``(B, 6)`` (this rank's pairs)."""
        margins, kl = margins.detach().float(), kl.detach().float()
        self._check(pair_ids, margins, kl)
        world = dist.get_world_size() if self.sync and dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return _tracker_op(self.state, pair_ids.long(), margins, kl, self.alpha, self.backend)
        packed = torch.stack([pair_ids.to(torch.float64), margins.double(), kl.double()])  # ids exact in float64
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        allp = torch.cat(gathered, 1)
        feats = _tracker_op(self.state, allp[0].long(), allp[1].float(), allp[2].float(), self.alpha, self.backend)
        b = pair_ids.shape[0]
        r = dist.get_rank()
        return feats[r * b:(r + 1) * b]

    def visits(self, pair_ids: torch.Tensor) -> torch.Tensor:
        """How many times each pair has been seen."""
        return self.state[pair_ids.long(), 5]

    def state_dict(self) -> dict:
        return {"state": self.state.detach().cpu().clone(), "alpha": self.alpha, "num_pairs": self.num_pairs,
                "columns": TRACKER_COLUMNS}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("num_pairs", "alpha"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"TemporalTracker.load_state_dict: saved {key}={sd[key]!r} differs from this tracker's "
                                 f"{getattr(self, key)!r}")
        self.state.copy_(sd["state"].to(self.state))
