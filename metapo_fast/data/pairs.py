"""Tokenised preference pairs: rows of any TRL format (:mod:`.formats`) -> token ids, truncated,
validated, cached; the entry point the trainer calls is :func:`load_preference_data`.

Pipeline::

    pairs = load_preference_data(cfg.data, tokenizer)            # TokenizedPairs, invalid rows reported
    margins = <reference log-prob margins of every pair>          # train.setup: ref model over PreferenceDataset(pairs)
    train_ds, val_ds = build_datasets(pairs, margins, cfg.data)  # data.batches: split, datasets
    batch = PreferenceCollator(tokenizer.pad_token_id)([train_ds[i] for i in next(iter(sampler))])

Identity (docs/math.md section 7): ``source_row`` is the record's 0-based index in the input (the
line of a JSONL file, blank lines skipped); ``pair_id`` is the index inside a
:class:`~metapo_fast.data.batches.PreferenceDataset`, i.e. after invalid rows are removed and the
validation split is taken. Both are deterministic, so the tracker row of a pair is stable across
epochs, ranks and resumes.

Truncation (``data.truncation``): ``keep_end`` / ``keep_start`` cut the prompt to
``max_prompt_length`` tokens (keeping its BOS), then each response to the room left in
``max_length`` (responses keep their start). ``drop`` instead reports a pair whose prompt exceeds
``max_prompt_length`` or whose prompt + response exceeds ``max_length`` as invalid
(``prompt_too_long`` / ``too_long``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..config import DataConfig
from ..files import sha256_file
from .formats import InvalidDataError, InvalidRow, RowError, detect_format, load_rows, split_row

__all__ = ["TokenizedPairs", "load_preference_data", "tokenizer_fingerprint", "default_cache_dir", "EXTRA_COLUMNS"]

log = logging.getLogger(__name__)
DATA_VERSION = 1  # bump when tokenisation output changes: part of the cache key


@dataclass
class TokenizedPairs:
    """Valid pairs after tokenisation (index = position among valid pairs) and the invalid-row report.

    Attributes:
        source: file path, hub id or ``"synthetic"``.
        prompt_ids / chosen_ids / rejected_ids: one int32 array per pair; responses end with EOS
            unless truncation cut them.
        source_rows: ``(N,)`` 0-based record index in the input of each pair.
        extra: ground-truth columns when present (``is_flipped``, ``is_ambiguous``): int8, -1 = absent.
        invalid: every dropped record as ``(source_row, reason)``.
        num_rows: records read. format: detected format. cache_hit: loaded from the cache.
    """

    source: str
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    source_rows: np.ndarray
    extra: dict = field(default_factory=dict)
    invalid: list = field(default_factory=list)
    num_rows: int = 0
    format: str = "standard"
    cache_hit: bool = False
    cache_path: Optional[str] = None

    def __len__(self) -> int:
        return len(self.source_rows)

    def invalid_summary(self) -> dict[str, int]:
        """Count of invalid rows by reason code."""
        out: dict[str, int] = {}
        for r in self.invalid:
            out[r.code] = out.get(r.code, 0) + 1
        return dict(sorted(out.items()))

    def save_invalid(self, path: str) -> None:
        """Write the invalid rows as JSONL ``{"source_row", "reason"}`` (e.g. into the run directory)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for r in self.invalid:
                fh.write(json.dumps({"source": self.source, "source_row": r.source_row, "reason": r.reason}) + "\n")

    def report(self, first: int = 5) -> str:
        """One line: valid / total rows, invalid counts by reason and the first invalid rows, numbered
        from 1 like the lines of a JSONL file (``source_row`` in pair_weights.csv and invalid_rows.jsonl
        counts from 0)."""
        s = f"{self.source}: {len(self)} valid pairs of {self.num_rows} rows ({self.format} format)"
        if self.invalid:
            counts = ", ".join(f"{k} {v}" for k, v in self.invalid_summary().items())
            rows = "; ".join(f"row {r.source_row + 1}: {r.reason}" for r in self.invalid[:first])
            s += f"; {len(self.invalid)} invalid ({counts}); first (rows counted from 1, as file lines are): {rows}"
        return s


EXTRA_COLUMNS = ("is_flipped", "is_ambiguous")


def _truncate(p: list, ch: list, rj: list, c: DataConfig, bos: Optional[int]) -> tuple[list, list, list]:
    """Apply ``c.truncation`` to prompt / chosen / rejected ids (see the module docstring)."""
    if c.truncation == "drop":
        if len(p) > c.max_prompt_length:
            raise RowError("prompt_too_long", f"prompt has {len(p)} tokens > data.max_prompt_length={c.max_prompt_length}")
        longest = len(p) + max(len(ch), len(rj))
        if longest > c.max_length:
            raise RowError("too_long", f"prompt + response has {longest} tokens > data.max_length={c.max_length}")
        return p, ch, rj
    if len(p) > c.max_prompt_length:
        keep_bos = bos is not None and p[0] == bos
        body, m = (p[1:], c.max_prompt_length - 1) if keep_bos else (p, c.max_prompt_length)
        body = body[len(body) - m:] if c.truncation == "keep_end" else body[:m]
        p = ([bos] if keep_bos else []) + body
    room = c.max_length - len(p)
    ch, rj = ch[:room], rj[:room]
    if ch == rj:
        raise RowError("identical", f"chosen and rejected are identical after truncation to {room} response tokens")
    return p, ch, rj


def _flag(v: Any) -> int:
    """A ground-truth flag as 1/0, or -1 when absent or not a boolean."""
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
        return int(v)
    return -1


PROGRESS_MIN_TEXTS = 20_000  # a progress bar (rank 0, on a terminal) from this many texts on


def _tokenize(tokenizer, texts: list[str]) -> list:
    """Token ids of each text (batches of 1024); a text the tokenizer rejects gives its error message."""
    import sys

    from tqdm.auto import tqdm

    from ..comm import rank

    out: list = []
    bar = tqdm(total=len(texts), desc="tokenising", unit=" texts", dynamic_ncols=True,
               disable=len(texts) < PROGRESS_MIN_TEXTS or rank() != 0 or not sys.stderr.isatty())
    for i in range(0, len(texts), 1024):
        bar.update(min(1024, len(texts) - i))
        chunk = texts[i:i + 1024]
        try:
            out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        except (TypeError, ValueError):  # isolate the offending text(s)
            for t in chunk:
                try:
                    out.append(tokenizer(t, add_special_tokens=False)["input_ids"])
                except (TypeError, ValueError) as e:
                    out.append(f"{type(e).__name__}: {e}")
    bar.close()
    return out


def _build(rows: Iterable, c: DataConfig, tokenizer, source: str, fmt: str, has_prompt: bool) -> TokenizedPairs:
    bos = tokenizer.bos_token_id if c.add_bos else None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidDataError(f"{source}: the tokenizer has no EOS token; responses must end with one")
    if fmt == "conversational" and not getattr(tokenizer, "chat_template", None):
        raise InvalidDataError(f"{source}: conversational data needs a tokenizer with a chat template")
    invalid: list[InvalidRow] = []
    keep_rows, texts, extra = [], [], {k: [] for k in EXTRA_COLUMNS}
    n = 0
    for n, row in enumerate(rows, 1):
        i = n - 1
        try:
            triple = split_row(row, c, tokenizer, fmt, has_prompt)
        except RowError as e:
            invalid.append(InvalidRow(i, e.reason))
            continue
        keep_rows.append(i)
        texts.extend(triple)
        for k in EXTRA_COLUMNS:
            extra[k].append(_flag(row.get(k)))
    ids = _tokenize(tokenizer, texts) if texts else []
    prompts, chosens, rejecteds, rows_out = [], [], [], []
    extra_out = {k: [] for k in EXTRA_COLUMNS}
    for j, src in enumerate(keep_rows):
        p, ch, rj = ids[3 * j], ids[3 * j + 1], ids[3 * j + 2]
        try:
            failed = [x for x in (p, ch, rj) if isinstance(x, str)]
            if failed:
                raise RowError("tokenizer_error", f"the tokenizer rejected the text: {failed[0]}")
            if bos is not None and (not p or p[0] != bos):
                p = [bos] + p
            ch = ch if ch and ch[-1] == eos else ch + [eos]
            rj = rj if rj and rj[-1] == eos else rj + [eos]
            if not p:
                raise RowError("empty", "the prompt has no tokens and the tokenizer has no BOS token to start it")
            p, ch, rj = _truncate(p, ch, rj, c, bos)
        except RowError as e:
            invalid.append(InvalidRow(src, e.reason))
            continue
        prompts.append(np.asarray(p, np.int32))
        chosens.append(np.asarray(ch, np.int32))
        rejecteds.append(np.asarray(rj, np.int32))
        rows_out.append(src)
        for k in EXTRA_COLUMNS:
            extra_out[k].append(extra[k][j])
    invalid.sort()
    extra_arr = {k: np.asarray(v, np.int8) for k, v in extra_out.items() if any(x >= 0 for x in v)}
    return TokenizedPairs(source, prompts, chosens, rejecteds, np.asarray(rows_out, np.int64), extra_arr, invalid, n, fmt)


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary/model, chat template and special-token ids of ``tokenizer``."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    return h.hexdigest()


def _cache_key(c: DataConfig, source_id: Mapping, tokenizer) -> str:
    material = {
        "version": DATA_VERSION, "source": source_id, "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": c.format, "columns": [c.prompt_column, c.chosen_column, c.rejected_column],
        "max_length": c.max_length, "max_prompt_length": c.max_prompt_length,
        "truncation": c.truncation, "add_bos": c.add_bos,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _flat(arrays: list) -> tuple[np.ndarray, np.ndarray]:
    lens = np.asarray([len(a) for a in arrays], np.int64)
    return (np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)), lens


def _unflat(flat: np.ndarray, lens: np.ndarray) -> list:
    return np.split(flat, np.cumsum(lens)[:-1]) if len(lens) else []


def _save_cache(path: str, tp: TokenizedPairs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"source_rows": tp.source_rows}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        arrays[name], arrays[name + "_len"] = _flat(getattr(tp, name))
    for k, v in tp.extra.items():
        arrays["extra_" + k] = v
    meta = {"source": tp.source, "num_rows": tp.num_rows, "format": tp.format, "invalid": [list(r) for r in tp.invalid]}
    arrays["meta_json"] = np.asarray(json.dumps(meta))
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_cache(path: str) -> Optional[TokenizedPairs]:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            lists = {n: _unflat(z[n], z[n + "_len"]) for n in ("prompt_ids", "chosen_ids", "rejected_ids")}
            extra = {k[6:]: z[k] for k in z.files if k.startswith("extra_")}
            return TokenizedPairs(meta["source"], source_rows=z["source_rows"], extra=extra,
                                  invalid=[InvalidRow(int(a), str(b)) for a, b in meta["invalid"]],
                                  num_rows=meta["num_rows"], format=meta["format"], cache_hit=True, cache_path=path, **lists)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("tokenisation cache %s is unreadable (%s); rebuilding it", path, e)
        return None


def default_cache_dir(c: DataConfig) -> str:
    return c.cache_dir or os.environ.get("METAPO_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metapo_fast")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def load_preference_data(c: DataConfig, tokenizer, which: str = "train",
                         rows: Optional[Sequence] = None, source_name: str = "<rows>") -> Optional[TokenizedPairs]:
    """Load, validate and tokenise the ``which`` ("train" or "eval") data of ``c``; cached.

    ``rows`` (a list of records) bypasses loading and the cache. Returns None for ``which="eval"``
    when no held-out data is configured. Invalid rows are logged with a count by reason; with
    ``c.invalid_rows == "error"`` any invalid row raises :class:`InvalidDataError` naming the
    source and the first bad rows.
    """
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    source_id, path = None, None
    if rows is not None:
        source = source_name
    elif which == "train":
        path, split = c.path, c.split
    elif c.eval_path is not None:
        path, split = c.eval_path, c.eval_split or "train"
    elif c.path is not None:
        if c.eval_split is None:
            return None
        path, split = c.path, c.eval_split
    if rows is None and path is None:
        from .synthetic import SYNTHETIC_VERSION, task_from_config

        s = c.synthetic
        task = task_from_config(s)
        rows = task.train_rows if which == "train" else task.eval_rows
        source = f"synthetic:{which}"
        source_id = {"synthetic": asdict(s), "which": which, "version": SYNTHETIC_VERSION}
    elif rows is None:
        rows = load_rows(path, split, c.subset, c.revision, c.cache_dir)
        if os.path.isfile(path):
            source, source_id = path, {"file_sha256": sha256_file(path)}
        else:
            source = f"{path}[{split}]"
            source_id = {"hub": path, "subset": c.subset, "split": split, "revision": c.revision,
                         "fingerprint": getattr(rows, "_fingerprint", None)}  # changes with the hub data
    cache_path = None
    if c.cache and source_id is not None:
        cache_path = os.path.join(default_cache_dir(c), "tokenized", _cache_key(c, source_id, tokenizer) + ".npz")
    result = _load_cache(cache_path) if cache_path and os.path.isfile(cache_path) else None
    if result is None:
        names = getattr(rows, "column_names", None)  # a datasets.Dataset knows its columns
        if names is None:
            names = {k for _, r in zip(range(1000), rows) if isinstance(r, Mapping) for k in r}
        fmt = detect_format(rows, c, source)
        result = _build(rows, c, tokenizer, source, fmt, c.prompt_column in names)
        if cache_path:
            _save_cache(cache_path, result)
            result.cache_path = cache_path
    if result.invalid:
        if c.invalid_rows == "error":
            raise InvalidDataError(f"{result.report()} (data.invalid_rows='error'; set data.invalid_rows=drop to drop them)")
        log.warning("dropped invalid rows: %s", result.report())
    if len(result) == 0:
        raise InvalidDataError(f"{result.report()}: no valid pairs left")
    return result
