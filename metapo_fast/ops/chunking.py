"""The one chunk schedule of the LM-head ops: which rows of the flattened ``(2B*T)`` hidden states
each chunk's GEMM reads. Used by the fused preference loss (``preference_loss.py``) and the ghost
pass over the LM head (``metapo/ghost.py``), so the memory rule and the row rule are written once.

Rows: sequence ``s`` (the B chosen rows, then the B rejected) owns rows ``s*T .. s*T+T-1``. The
rows that carry no label (prompt, padding: ``ignore_index``) are dropped before the GEMMs on CPU (a
data-dependent size, free on the host) and, on CUDA, when the caller passes the host's copy of the
mask (``host_mask``: the collated labels are on the host first; the trainer passes them); without
it, CUDA keeps every row (dropping them would need a host sync) with a zero coefficient.

Memory rule: a chunk holds at most ``rows_per_chunk = chunk_bytes // (V * itemsize * (2 with a
reference else 1))`` rows of logits; on CUDA :func:`pair_rows_on_device` raises it to one whole pair
when that pair fits the device's free memory (so on CUDA a small ``chunk_bytes`` does not force
streaming while memory allows a whole pair). Schedules:

* :meth:`ChunkSchedule.layout`: the fused loss's whole schedule built once per call, groups of
  whole pairs (as many as fit, at least one) or, when one pair's ``2T`` rows do not fit, one pair
  per group in blocks of one sequence's rows (the streamed-pair path); see :class:`PairLayout`.
* :meth:`ChunkSchedule.pair_chunks` / :meth:`ChunkSchedule.seq_chunks`: the same groupings chunk by
  chunk.
* :meth:`ChunkSchedule.token_chunks`: blocks of ``rows_per_chunk`` rows over all sequences, for
  per-token work that needs no pair grouping (the ghost pass).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "Chunk", "ChunkSchedule", "PairLayout", "checked_host_labels", "compact_rows", "force_row_rule",
           "host_label_mask",
           "pair_rows_on_device"]

_FORCED_COMPACT: Optional[bool] = None


def checked_host_labels(labels: torch.Tensor, host_labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``host_labels``, the CPU copy of ``labels`` (the collated batch before its copy to the GPU),
    checked (shape, integer dtype, on the CPU); None without one. The fused loss reads the rows'
    mask and targets from it on CUDA; for CPU ``labels`` it reads their own values, and a copy given
    with them only selects the host's row rule on the CUDA code path (its values are not trusted)."""
    if host_labels is None:
        return None
    if host_labels.shape != labels.shape or host_labels.device.type != "cpu" or host_labels.is_floating_point():
        raise ValueError(f"host_labels must be an integer CPU copy of labels {tuple(labels.shape)}, got "
                         f"{tuple(host_labels.shape)} {host_labels.dtype} on {host_labels.device}")
    return host_labels


def host_label_mask(labels: torch.Tensor, host_labels: Optional[torch.Tensor], ignore_index: int) -> Optional[torch.Tensor]:
    """The labelled-row mask from ``host_labels`` (see :func:`checked_host_labels`); None without
    one. On CUDA the schedules take their row indices from it, so prompt and padding rows are
    dropped without a host sync."""
    host_labels = checked_host_labels(labels, host_labels)
    return None if host_labels is None else host_labels != ignore_index


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


@dataclass
class PairLayout:
    """Every chunk of the fused loss, built once before the loop (a few ops for the whole batch
    instead of a dozen per chunk). Pairs are cut into groups of consecutive pairs ``[i0, i1)``; a
    group's sequences are its chosen ones then its rejected ones, and the groups' sequences laid end
    to end are the *layout order* (group g occupies positions ``2 i0 .. 2 i1 - 1``). A group is one
    chunk (whole pairs) or, streamed, one pair whose rows come in blocks of one sequence each.

    Host arrays (NumPy): the caller copies what it needs to the device (the fused loss packs them
    into one array and one copy).

    Attributes:
        rows_host: ``(R,)`` flat rows of every block, block after block.
        col_host: ``(R,)`` the column of each row's sequence within its group (``side * n_g + j``).
        order_host: ``(2B,)`` the sequence at each layout position; ``pos_host``: its inverse.
        groups: ``(i0, i1)`` per group; ``group_rows``: rows per group.
        blocks: per group, ``(rows, side)`` per block (side 0/1 for a streamed sequence, -1 for a
            whole-pairs chunk).
    """

    rows_host: np.ndarray
    col_host: np.ndarray
    order_host: np.ndarray
    pos_host: np.ndarray
    groups: list
    group_rows: list
    blocks: list


class ChunkSchedule:
    """Chunks over the rows of ``labels_mask`` (``(2B*T,)`` bool, True where a row carries a label).

    Args:
        labels_mask: flat ``(2B*T,)`` mask of the rows that carry a label, on the op's device; may be
            None when ``host_mask`` is given (then pass ``device``): the rule is the host's.
        num_seqs: 2B.
        seq_len: T.
        rows_per_chunk: the memory rule's row budget (see :func:`rows_per_chunk`).
        compact: drop the rows without a label (CPU); keep every row (CUDA: no host sync).
        host_mask: optional CPU copy of ``labels_mask``, a tensor or a NumPy array (the collated batch's labels are on the host
            before they are copied to the GPU). With it the rows without a label are dropped on
            any device: the row indices are computed on the host and copied to the device
            (``non_blocking``), so the GEMMs see only labelled rows and nothing syncs.
        device: the op's device when ``labels_mask`` is None.
    """

    def __init__(self, labels_mask: Optional[torch.Tensor], num_seqs: int, seq_len: int, rows_per_chunk: int, compact: bool,
                 host_mask: Optional[torch.Tensor] = None, device: Optional[torch.device] = None):
        if labels_mask is None and (host_mask is None or device is None):
            raise ValueError("ChunkSchedule: give labels_mask, or host_mask and device")
        self.mask, self.b2, self.t = labels_mask, num_seqs, seq_len
        self.bsz = num_seqs // 2
        self.rows_per_chunk = max(1, int(rows_per_chunk))
        self.device = labels_mask.device if labels_mask is not None else torch.device(device)
        self._host_np: Optional[np.ndarray] = None
        self.host_rule = host_mask is not None and (not compact or labels_mask is None)
        if self.host_rule:  # made exact by the host's copy: rows are built on the host, then copied
            if isinstance(host_mask, np.ndarray):  # already a host array (no tensor op)
                self._host_np = host_mask.reshape(-1).astype(bool, copy=False)
                hm = torch.from_dlpack(self._host_np)
            else:
                hm = host_mask.reshape(-1)
                hm = hm if hm.dtype == torch.bool else hm.bool()
            self._rule_mask, self._where, self.compact = hm, torch.device("cpu"), True
        else:
            self._rule_mask, self._where, self.compact = labels_mask, self.device, compact

    def index(self, values) -> torch.Tensor:
        """``values`` as an int64 index tensor on the schedule's device."""
        return self.to_device(torch.tensor(values, dtype=torch.long))

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host-built index tensor on the op's device. To CUDA through pinned memory: a copy from
        pageable memory waits for the device (a host sync per tensor), a pinned one is queued."""
        if x.device == self.device:
            return x
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    @staticmethod
    def rows_for(chunk_bytes: int, vocab: int, itemsize: int, with_reference: bool) -> int:
        """Rows of logits that fit ``chunk_bytes`` (policy and, ``with_reference``, reference logits)."""
        return max(1, int(chunk_bytes) // (vocab * itemsize * (2 if with_reference else 1)))

    @property
    def pairs_fit(self) -> bool:
        """Whether one pair's ``2T`` rows fit a chunk (then :meth:`pair_chunks` applies)."""
        return 2 * self.t <= self.rows_per_chunk

    def rows_of(self, seqs: torch.Tensor) -> torch.Tensor:
        """Flat rows of the sequences ``seqs`` (labelled rows only when compacting), computed where
        the rule's mask lives (the host with ``host_mask``); not yet moved to the device."""
        seqs = seqs.to(self._where)
        rows = (seqs.unsqueeze(1) * self.t + torch.arange(self.t, device=self._where)).reshape(-1)
        return rows[self._rule_mask[rows]] if self.compact else rows

    def pair_chunks(self) -> Iterator[Chunk]:
        """Whole pairs per chunk (requires :attr:`pairs_fit`)."""
        step = max(1, self.rows_per_chunk // (2 * self.t))
        for i0 in range(0, self.bsz, step):
            i1 = min(i0 + step, self.bsz)
            n = i1 - i0
            pairs = torch.arange(i0, i1, device=self._where)
            seqs = torch.cat([pairs, pairs + self.bsz])
            rows = self.rows_of(seqs)
            seq = torch.div(rows, self.t, rounding_mode="floor")
            seq_local = torch.where(seq >= self.bsz, seq - self.bsz + n, seq) - i0
            yield Chunk(*(self.to_device(x) for x in (rows, seq, pairs, seqs, seq_local)))

    def seq_chunks(self, s: int) -> list[torch.Tensor]:
        """The rows of sequence ``s`` in blocks of at most ``rows_per_chunk`` (device tensors)."""
        rows = self.rows_of(torch.tensor([s], dtype=torch.long))
        return [self.to_device(r) for r in rows.split(self.rows_per_chunk)] if rows.numel() else []

    def layout(self, streamed: bool) -> PairLayout:
        """The whole schedule of the fused loss at once (see :class:`PairLayout`): whole pairs per
        group (:meth:`pair_chunks`' grouping) or, ``streamed``, one pair per group in blocks of at
        most ``rows_per_chunk`` rows of one sequence (:meth:`seq_chunks`' blocks). Host arithmetic
        in NumPy (no tensor op), from the host's mask."""
        t, bsz, b2 = self.t, self.bsz, self.b2
        npc = 1 if streamed else max(1, self.rows_per_chunk // (2 * t))
        groups = [(i0, min(i0 + npc, bsz)) for i0 in range(0, bsz, npc)]
        order = np.concatenate([np.r_[i0:i1, bsz + i0:bsz + i1] for i0, i1 in groups]).astype(np.int64)
        col = np.concatenate([np.arange(2 * (i1 - i0)) for i0, i1 in groups]).astype(np.int64)
        pos = np.empty(b2, dtype=np.int64)
        pos[order] = np.arange(b2)
        rows = (order[:, None] * t + np.arange(t)).reshape(-1)
        cols = np.repeat(col, t)
        if self.compact:
            keep = self.host_rule_mask()[rows]
            rows, cols = rows[keep], cols[keep]
            per_seq = keep.reshape(b2, t).sum(1).tolist()
        else:
            per_seq = [t] * b2
        blocks, group_rows, k = [], [], 0
        for i0, i1 in groups:
            n2 = 2 * (i1 - i0)
            seq_rows = per_seq[k:k + n2]
            k += n2
            if streamed:
                bl = [(min(self.rows_per_chunk, r - a), side) for side, r in enumerate(seq_rows)
                      for a in range(0, r, self.rows_per_chunk)]
            else:
                bl = [(sum(seq_rows), -1)]
            blocks.append(bl)
            group_rows.append(sum(seq_rows))
        return PairLayout(rows, cols, order, pos, groups, group_rows, blocks)

    def host_rule_mask(self) -> np.ndarray:
        """The rule's mask as a host array: a view of the host's mask, or (the compact rule forced onto
        a device mask: tests only) a copy that reads the device."""
        if self._host_np is None:
            m = self._rule_mask
            self._host_np = (m if m.device.type == "cpu" else m.cpu()).reshape(-1).numpy()
        return self._host_np

    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row the rule keeps, over all sequences in order, and its sequence: ``(rows, seq)``
        on the device, computed where the rule's mask lives (no sync). Per-token work that needs no
        pair grouping (the ghost pass) takes them in blocks of at most ``rows_per_chunk``."""
        rows = self.rows_of(torch.arange(self.b2, device=self._where))
        seq = torch.div(rows, self.t, rounding_mode="floor")
        if not self.host_rule:  # built where the device mask lives: nothing to copy
            return rows, seq
        return self.to_device(rows), self.to_device(seq)


def pair_rows_on_device(rows: int, seq_len: int, vocab: int, itemsize: int, with_reference: bool,
                        device: torch.device, headroom: float = 0.5) -> int:
    """The chunk policy: ``rows`` (from the ``chunk_bytes`` budget), raised on CUDA to one whole
    pair (``2T`` rows) when the budget is smaller but that pair's logits fit in ``headroom`` of the
    device's free memory (``torch.cuda.mem_get_info``: a driver query, no stream sync). The budget
    caps the memory of whole-pair chunks; it never causes recomputation: a pair that fits neither
    takes the streamed-pair path (still 8NHV, plus two V x H accumulators)."""
    need = 2 * seq_len
    if rows >= need or device.type != "cuda":
        return rows
    free, _ = torch.cuda.mem_get_info(device)
    pair_bytes = need * vocab * itemsize * (2 if with_reference else 1)
    return need if pair_bytes <= headroom * free else rows
