"""Preference data, from a file (or a hub dataset) to the batches the trainer steps on.

- ``formats.py``: reading files; TRL's standard / conversational, explicit / implicit-prompt rows;
  per-row checks that name the reason a row is dropped.
- ``pairs.py``: tokenising, truncation, the tokenisation cache, ``load_preference_data``.
- ``batches.py``: the validation split, ``PreferenceDataset``, the collator, the sampler.
- ``synthetic.py``: the embedded addition task with flipped and ambiguous pairs (no download).

Imports flow one way: formats <- pairs <- batches. May import ``config`` and ``files``; nothing from
``ops/``, ``metapo/``, ``models/`` or ``train/``.
"""
from .batches import IGNORE_INDEX, PairSampler, PreferenceCollator, PreferenceDataset, TrueLabels, build_datasets, split_validation
from .formats import INVALID_REASONS, InvalidDataError, InvalidRow, load_rows
from .pairs import TokenizedPairs, load_preference_data

__all__ = ["IGNORE_INDEX", "INVALID_REASONS", "InvalidDataError", "InvalidRow", "PairSampler", "PreferenceCollator",
           "PreferenceDataset", "TokenizedPairs", "TrueLabels", "build_datasets", "load_preference_data", "load_rows",
           "split_validation"]
