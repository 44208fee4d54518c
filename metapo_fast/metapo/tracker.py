"""The temporal tracker: each training pair's history, 6 float32 (24 bytes) per pair on the device,
updated in place every time the pair is in a batch (paper Sec. 3.2 / Algorithm 2, with the
departures of docs/math.md section 3: Welford with the true running mean; EMAs start at the
first observed value).

State columns ``[ema_margin, ema_std, ema_kl, mean, m2, count]``; features returned by
:meth:`TemporalTracker.update` ``[f1, ema1, f2, ema2, f3, ema3]`` after this visit's update.
Implementations: Triton (``kernels/tracker.py``, one launch, no host sync), C++
(``csrc/tracker.cpp``) and a vectorised PyTorch path (``ops/tracker_update.py``), all checked against
:func:`metapo_fast.ops.tracker_update.tracker_update_ref`. Repeated ids within one update are applied
sequentially in the order given.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import rank, world_size
from ..ops.tracker_update import FEATURE_NAMES, TRACKER_COLUMNS, tracker_update

__all__ = ["TemporalTracker", "TRACKER_COLUMNS", "FEATURE_NAMES"]

BYTES_PER_PAIR = 4 * len(TRACKER_COLUMNS)


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

    def gather(self, pair_ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor) -> tuple:
        """Every rank's ``(pair_ids int64, margins fp32, kl fp32)``, in rank order, by one all-gather
        (with ``sync`` and several ranks; otherwise this rank's, as given). A caller that needs them
        too (the trainer's last-visit table) passes them to :meth:`update` as ``every_rank``, so that
        a micro-batch makes one collective, not two."""
        margins, kl = margins.detach().float(), kl.detach().float()
        self._check(pair_ids, margins, kl)
        world = world_size() if self.sync else 1
        if world == 1:
            return pair_ids.long(), margins, kl
        packed = torch.stack([pair_ids.to(torch.float64), margins.double(), kl.double()])  # ids exact in float64
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        allp = torch.cat(gathered, 1)
        return allp[0].long(), allp[1].float(), allp[2].float()

    def update(self, pair_ids: torch.Tensor, margins: torch.Tensor, kl: torch.Tensor,
               every_rank: Optional[tuple] = None) -> torch.Tensor:
        """Update the pairs in place; return their features ``(B, 6)`` (this rank's pairs).
        ``every_rank``: what :meth:`gather` returned for these inputs (no second all-gather)."""
        if every_rank is None:
            every_rank = self.gather(pair_ids, margins, kl)
        ids, m, k = every_rank
        feats = tracker_update(self.state, ids, m, k, self.alpha, self.backend)
        b = pair_ids.shape[0]
        if ids.shape[0] == b:  # one rank (or sync off): every row is this rank's
            return feats
        if ids.shape[0] != b * world_size():
            raise ValueError(f"TemporalTracker.update: every_rank holds {ids.shape[0]} pairs, expected {b} per rank x {world_size()} ranks")
        r = rank()
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
