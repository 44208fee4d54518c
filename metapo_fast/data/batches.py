"""Batches of preference pairs: the validation split, the dataset, the collator and the sampler.

Identity rules (docs/math.md
section 7): an item's ``pair_id`` is its index in its :class:`PreferenceDataset`, i.e. after
invalid rows are removed and the validation split is taken; ``source_row`` is the record's index
in the input file.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..config import DataConfig
from .formats import InvalidDataError
from .pairs import TokenizedPairs

__all__ = ["IGNORE_INDEX", "split_validation", "PreferenceDataset", "build_datasets", "PreferenceCollator", "PairSampler"]

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------
# Validation split (docs/math.md section 6)
# ------------------------------------------------------------------------------------------------
def split_validation(ref_margins: Optional[np.ndarray], fraction: float, method: str = "stratified",
                     num_bins: int = 10, seed: int = 0, num_pairs: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train_idx, val_idx)`` over pairs ``0..N-1``, both sorted.

    ``n_val = round(fraction * N)`` (at least 1 when fraction > 0). ``stratified``: pairs are put in
    ``min(num_bins, n_val)`` equal-count bins by the rank of their reference margin
    ``logp_ref(y_w) - logp_ref(y_l)`` (quantile bins; ties broken by index), and each bin gives
    its share of ``n_val`` (largest remainder), drawn uniformly inside the bin, so every bin is
    represented and the validation margins follow the training distribution. ``random``: a uniform
    draw. ``ref_margins`` may be None for ``random`` or ``fraction == 0`` (then ``num_pairs`` gives N).
    """
    if method not in ("stratified", "random"):
        raise ValueError(f"method must be 'stratified' or 'random', got {method!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if ref_margins is not None:
        ref_margins = np.asarray(ref_margins, dtype=np.float64).reshape(-1)
        if num_pairs is not None and num_pairs != len(ref_margins):
            raise ValueError(f"num_pairs={num_pairs} but ref_margins has {len(ref_margins)} entries")
        n = len(ref_margins)
    elif num_pairs is None:
        raise ValueError("pass ref_margins or num_pairs")
    else:
        n = int(num_pairs)
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * n)))
    if n_val == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    if n_val >= n:
        raise ValueError(f"validation fraction {fraction} of {n} pairs leaves no training pairs")
    if method == "stratified" and ref_margins is None:
        raise ValueError("a stratified split needs ref_margins (the reference model's log-prob margins)")
    rng = np.random.default_rng(seed)
    if method == "random":
        val = rng.choice(n, size=n_val, replace=False)
    else:
        if not np.all(np.isfinite(ref_margins)):
            bad = np.flatnonzero(~np.isfinite(ref_margins))
            raise ValueError(f"ref_margins has {len(bad)} non-finite values (first at pairs {bad[:5].tolist()})")
        bins = min(num_bins, n_val)
        order = np.argsort(ref_margins, kind="stable")
        bin_of = np.empty(n, np.int64)
        bin_of[order] = np.arange(n) * bins // n
        sizes = np.bincount(bin_of, minlength=bins)
        quota = sizes * n_val / n
        take = np.floor(quota).astype(np.int64)
        for b in np.argsort(-(quota - take), kind="stable")[: n_val - take.sum()]:
            take[b] += 1
        val = np.concatenate([rng.choice(np.flatnonzero(bin_of == b), size=int(take[b]), replace=False) for b in range(bins)])
    val = np.sort(val.astype(np.int64))
    mask = np.ones(n, bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


# ------------------------------------------------------------------------------------------------
# Dataset, collation, sampler
# ------------------------------------------------------------------------------------------------
class PreferenceDataset(torch.utils.data.Dataset):
    """The pairs ``pairs[indices]``; item ``k`` has ``pair_id == k`` (the tracker row).

    Items: ``{"pair_id", "source_row", "prompt_ids", "chosen_ids", "rejected_ids"}`` (ids as int32
    NumPy arrays; responses end with EOS).
    """

    def __init__(self, pairs: TokenizedPairs, indices: Optional[Sequence[int]] = None):
        self.pairs = pairs
        self.indices = np.arange(len(pairs), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(pairs)):
            raise IndexError(f"indices out of range for {len(pairs)} pairs")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pair_id: int) -> dict:
        if not 0 <= pair_id < len(self.indices):
            raise IndexError(f"pair_id {pair_id} out of range for a dataset of {len(self.indices)} pairs")
        j = int(self.indices[pair_id])
        p = self.pairs
        return {"pair_id": int(pair_id), "source_row": int(p.source_rows[j]), "prompt_ids": p.prompt_ids[j],
                "chosen_ids": p.chosen_ids[j], "rejected_ids": p.rejected_ids[j]}

    @property
    def source_rows(self) -> np.ndarray:
        """Source row of every pair_id."""
        return self.pairs.source_rows[self.indices]

    def prompt_groups(self) -> np.ndarray:
        """``(N,)`` int64: per pair_id, the index of its prompt among the distinct prompts (pairs
        whose prompt token ids are identical share one), numbered in order of first appearance."""
        seen: dict = {}
        return np.array([seen.setdefault(np.asarray(self.pairs.prompt_ids[j]).tobytes(), len(seen))
                         for j in self.indices], dtype=np.int64)

    def column(self, name: str) -> np.ndarray:
        """A ground-truth column (e.g. ``is_flipped``) per pair_id."""
        if name not in self.pairs.extra:
            raise KeyError(f"column {name!r} not in the data; available: {sorted(self.pairs.extra)}")
        return self.pairs.extra[name][self.indices]


def build_datasets(pairs: TokenizedPairs, ref_margins: Optional[np.ndarray], c: DataConfig) -> tuple[PreferenceDataset, PreferenceDataset]:
    """Train and validation datasets by :func:`split_validation` with the settings of ``c``."""
    train_idx, val_idx = split_validation(ref_margins, c.val_fraction, c.val_split, c.num_bins, c.split_seed, num_pairs=len(pairs))
    return PreferenceDataset(pairs, train_idx), PreferenceDataset(pairs, val_idx)


class TrueLabels(torch.utils.data.Dataset):
    """A view of a :class:`PreferenceDataset` whose flipped pairs (``is_flipped == 1``, known for
    the synthetic task) have chosen and rejected swapped back."""

    def __init__(self, ds: PreferenceDataset):
        self.ds, self.flipped = ds, ds.column("is_flipped") == 1

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, pair_id: int) -> dict:
        item = self.ds[pair_id]
        if self.flipped[pair_id]:
            item = {**item, "chosen_ids": item["rejected_ids"], "rejected_ids": item["chosen_ids"]}
        return item


class PreferenceCollator:
    """Items -> padded batch, the B chosen sequences first and the B rejected ones second.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (all ``(2B, T)`` int64, right padding,
    T = longest sequence rounded up to ``pad_to_multiple_of``), ``pair_ids`` and ``source_rows``
    ``(B,)``. ``labels`` are already shifted: ``labels[:, t] = input_ids[:, t + 1]`` where token
    t + 1 is a response token, ``ignore_index`` elsewhere (prompt, padding, last position), so
    ``hidden[:, t]`` predicts ``labels[:, t]``.
    """

    def __init__(self, pad_token_id: int, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token) first")
        self.pad, self.ignore, self.multiple = int(pad_token_id), ignore_index, pad_to_multiple_of

    def __call__(self, items: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        seqs = [(it["prompt_ids"], it[k]) for k in ("chosen_ids", "rejected_ids") for it in items]
        T = max(len(p) + len(r) for p, r in seqs)
        if self.multiple:
            T = -(-T // self.multiple) * self.multiple
        ids = np.full((len(seqs), T), self.pad, np.int64)
        labels = np.full((len(seqs), T), self.ignore, np.int64)
        mask = np.zeros((len(seqs), T), np.int64)
        for row, (p, r) in enumerate(seqs):
            P, L = len(p), len(p) + len(r)
            ids[row, :P], ids[row, P:L] = p, r
            mask[row, :L] = 1
            labels[row, P - 1:L - 1] = r
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels),
                "pair_ids": torch.tensor([int(it["pair_id"]) for it in items], dtype=torch.int64),
                "source_rows": torch.tensor([int(it["source_row"]) for it in items], dtype=torch.int64)}


class PairSampler(torch.utils.data.Sampler):
    """Per-epoch shuffled batches of pair ids, sharded across ranks, resumable mid-epoch.

    Epoch ``e`` uses the permutation of ``default_rng([seed, e])``; global batch ``b`` is
    ``perm[b*G:(b+1)*G]`` with ``G = per_device_batch_size * world_size`` and rank ``r`` takes the
    slice ``[r*per_device:(r+1)*per_device]`` of it, so ranks are disjoint and together cover the
    global batch. The last ``N mod G`` pairs of each permutation are dropped (different ones every
    epoch). Iterating yields the rest of the current epoch from ``offset`` (batches already
    consumed), then moves to the next epoch; ``state_dict()`` after k yielded batches resumes at
    batch k. Use it as a DataLoader ``batch_sampler`` with ``num_workers=0`` (or feed the
    collator directly) so that yielded == consumed.
    """

    def __init__(self, num_pairs: int, per_device_batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if per_device_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need per_device_batch_size >= 1, world_size >= 1, 0 <= rank < world_size; got "
                             f"{per_device_batch_size}, {world_size}, {rank}")
        super().__init__()
        self.global_batch = per_device_batch_size * world_size
        if num_pairs < self.global_batch:
            raise InvalidDataError(f"{num_pairs} training pairs are fewer than one global batch of {self.global_batch} "
                             f"({per_device_batch_size} per device x {world_size} ranks): add data or lower "
                             "train.per_device_batch_size")
        self.num_pairs, self.per_device, self.world_size, self.rank = num_pairs, per_device_batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.offset = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_pairs)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = int(epoch), 0

    def __iter__(self):
        perm = self.permutation(self.epoch)
        while self.offset < self.batches_per_epoch:
            start = self.offset * self.global_batch + self.rank * self.per_device
            self.offset += 1
            yield perm[start:start + self.per_device].tolist()
        self.epoch, self.offset = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_pairs": self.num_pairs,
                "global_batch": self.global_batch, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping) -> None:
        for k in ("seed", "num_pairs", "global_batch", "shuffle"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]!r} but this sampler has {getattr(self, k)!r}; "
                                 "the data, seed or global batch changed since the checkpoint")
        if not 0 <= int(state["offset"]) <= self.batches_per_epoch:
            raise ValueError(f"sampler state offset={state['offset']} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
