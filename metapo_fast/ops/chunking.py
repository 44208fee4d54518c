"""The one chunk schedule of the LM-head ops: which rows of the flattened ``(2B*T)`` hidden states
each chunk's GEMM reads. Used by the fused preference loss (``preference_loss.py``) and the ghost
pass over the LM head (``metapo/ghost.py``), so the memory rule and the row rule are written once.

Rows: sequence ``s`` (the B chosen rows, then the B rejected) owns rows ``s*T .. s*T+T-1``. On CPU
the rows that carry no label (prompt, padding: ``ignore_index``) are dropped before the GEMMs
(a data-dependent size, free on the host); on CUDA they are kept (dropping them would need a
host sync) and callers give them a zero coefficient.

Memory rule: a chunk holds at most ``rows_per_chunk = chunk_bytes // (V * itemsize * (2 with a
reference else 1))`` rows of logits. Two schedules:

* :meth:`ChunkSchedule.pair_chunks`: whole pairs per chunk (both responses' rows), as many as fit,
  at least one; used when one pair's ``2T`` rows fit.
* :meth:`ChunkSchedule.token_chunks`: blocks of ``rows_per_chunk`` rows over all sequences, for
  a pair that does not fit (the fused loss's two-phase path) and for per-token work that needs no
  pair grouping (the ghost pass).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "Chunk", "ChunkSchedule", "compact_rows", "force_row_rule"]

_FORCED_COMPACT: Optional[bool] = None


def compact_rows(device: torch.device) -> bool:
    """The row rule for tensors on ``device``: drop unlabelled rows on CPU, keep them on CUDA
    (unless :func:`force_row_rule` is active)."""
    return device.type == "cpu" if _FORCED_COMPACT is None else _FORCED_COMPACT


@contextlib.contextmanager
def force_row_rule(compact: bool):
    """Run the LM-head ops with one row rule whatever the device: ``compact=False`` runs the CUDA
    row path (every row through the GEMMs, zero coefficient on unlabelled rows) on CPU, for tests
    and ``benchmarks.counters``."""
    global _FORCED_COMPACT
    old, _FORCED_COMPACT = _FORCED_COMPACT, bool(compact)
    try:
        yield
    finally:
        _FORCED_COMPACT = old

# Logits budget per chunk (policy + reference logits together). 256 MiB holds 1024 rows of fp32
# V=32000 logits with a reference: 2 pairs of T=256 per chunk, GEMMs of 1024 rows that run at full
# MKL speed on CPU; on an H100 it is 512 rows of bf16 V=128256 with a reference. Users with more
# memory raise it (fewer, larger GEMMs).
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


@dataclass
class Chunk:
    """One chunk: ``rows`` (flat row indices), ``seq`` (the sequence of each row, ``(len(rows),)``),
    and for pair chunks ``pairs`` (the chunk's pair indices) and ``seqs`` (its sequences: the
    chosen ones, then the rejected ones); ``seq_local`` indexes ``seqs``."""

    rows: torch.Tensor
    seq: torch.Tensor
    pairs: torch.Tensor = None
    seqs: torch.Tensor = None
    seq_local: torch.Tensor = None


class ChunkSchedule:
    """Chunks over the rows of ``labels_mask`` (``(2B*T,)`` bool, True where a row carries a label).

    Args:
        labels_mask: flat ``(2B*T,)`` mask of the rows that carry a label.
        num_seqs: 2B.
        seq_len: T.
        rows_per_chunk: the memory rule's row budget (see :func:`rows_per_chunk`).
        compact: drop the rows without a label (CPU); keep every row (CUDA: no host sync).
    """

    def __init__(self, labels_mask: torch.Tensor, num_seqs: int, seq_len: int, rows_per_chunk: int, compact: bool):
        self.mask, self.b2, self.t = labels_mask, num_seqs, seq_len
        self.bsz = num_seqs // 2
        self.rows_per_chunk, self.compact = max(1, int(rows_per_chunk)), compact

    @staticmethod
    def rows_for(chunk_bytes: int, vocab: int, itemsize: int, with_reference: bool) -> int:
        """Rows of logits that fit ``chunk_bytes`` (policy and, ``with_reference``, reference logits)."""
        return max(1, int(chunk_bytes) // (vocab * itemsize * (2 if with_reference else 1)))

    @property
    def pairs_fit(self) -> bool:
        """Whether one pair's ``2T`` rows fit a chunk (then :meth:`pair_chunks` applies)."""
        return 2 * self.t <= self.rows_per_chunk

    def rows_of(self, seqs: torch.Tensor) -> torch.Tensor:
        """Flat rows of the sequences ``seqs`` (labelled rows only when compacting)."""
        rows = (seqs.unsqueeze(1) * self.t + torch.arange(self.t, device=seqs.device)).reshape(-1)
        return rows[self.mask[rows]] if self.compact else rows

    def pair_chunks(self) -> Iterator[Chunk]:
        """Whole pairs per chunk (requires :attr:`pairs_fit`)."""
        dev = self.mask.device
        step = max(1, self.rows_per_chunk // (2 * self.t))
        for i0 in range(0, self.bsz, step):
            i1 = min(i0 + step, self.bsz)
            n = i1 - i0
            pairs = torch.arange(i0, i1, device=dev)
            seqs = torch.cat([pairs, pairs + self.bsz])
            rows = self.rows_of(seqs)
            seq = torch.div(rows, self.t, rounding_mode="floor")
            seq_local = torch.where(seq >= self.bsz, seq - self.bsz + n, seq) - i0
            yield Chunk(rows, seq, pairs, seqs, seq_local)

    def token_chunks(self) -> list[Chunk]:
        """Blocks of at most ``rows_per_chunk`` rows over all sequences (a list: two-phase callers
        walk it twice)."""
        all_rows = self.rows_of(torch.arange(self.b2, device=self.mask.device))
        return [Chunk(rows, torch.div(rows, self.t, rounding_mode="floor")) for rows in all_rows.split(self.rows_per_chunk)]
