"""Preference data: loading, TRL formats, per-row validation, tokenisation, cache, batches, sampler.

Pipeline (what the trainer calls)::

    pairs = load_preference_data(cfg.data, tokenizer)            # TokenizedPairs, invalid rows reported
    margins = <reference log-prob margins of every pair>          # trainer: ref model over PreferenceDataset(pairs)
    train_idx, val_idx = split_validation(margins, cfg.data.val_fraction, cfg.data.val_split,
                                          cfg.data.num_bins, cfg.data.split_seed, num_pairs=len(pairs))
    train_ds, val_ds = PreferenceDataset(pairs, train_idx), PreferenceDataset(pairs, val_idx)
    sampler = PairSampler(len(train_ds), per_device, world_size, rank, seed)
    batch = PreferenceCollator(tokenizer.pad_token_id)([train_ds[i] for i in next(iter(sampler))])

Formats (TRL's): *standard* rows hold strings, *conversational* rows lists of ``{"role", "content"}``
messages rendered with ``tokenizer.apply_chat_template``. *Explicit* rows have a prompt column;
*implicit* rows only chosen/rejected, whose shared prefix is the prompt (strings: the common prefix
cut back to the last whitespace, so no response starts mid-word; messages: the common leading
messages). A conversational row whose prompt is a string (HuggingFaceH4/ultrafeedback_binarized)
takes the shared leading messages as prompt, or the string as one user message if there are none.

Identity (docs/math.md section 7): ``source_row`` is the record's 0-based index in the input (the
line of a JSONL file, blank lines skipped); ``pair_id`` is the index inside a
:class:`PreferenceDataset`, i.e. after invalid rows are removed and the validation split is taken.
Both are deterministic, so the tracker row of a pair is stable across epochs, ranks and resumes.

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
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

# The split, the dataset, the collator and the sampler live in batching.py; re-exported here.
from .checkpoint import sha256_file
from .batching import IGNORE_INDEX, PairSampler, PreferenceCollator, PreferenceDataset, build_datasets, split_validation
from .config import DataConfig

__all__ = [
    "InvalidRow", "InvalidDataError", "TokenizedPairs", "PreferenceDataset", "PreferenceCollator",
    "PairSampler", "load_rows", "load_preference_data", "split_validation", "build_datasets",
    "INVALID_REASONS", "IGNORE_INDEX",
]

log = logging.getLogger(__name__)
DATA_VERSION = 1  # bump when tokenisation output changes: part of the cache key
ROLES = ("system", "user", "assistant", "tool")
LOCAL_EXTENSIONS = (".json", ".jsonl", ".parquet")
INVALID_REASONS = {
    "not_a_row": "the record is not a mapping of columns",
    "not_json": "a JSONL line that is not valid JSON",
    "missing_column": "a required column is absent or null",
    "wrong_type": "a value of the wrong type (e.g. a number or bytes for a response)",
    "bad_encoding": "invalid UTF-8 / lone surrogate in a string",
    "empty": "an empty or whitespace-only response (or nothing left of the prompt)",
    "bad_role": "a conversational message with an unknown role, or a response not starting with 'assistant'",
    "identical": "chosen and rejected are identical (as text, or as tokens after truncation)",
    "template_error": "the chat template failed or did not extend the rendered prompt",
    "tokenizer_error": "the tokenizer raised an error on the text",
    "prompt_too_long": "prompt longer than max_prompt_length (truncation=drop)",
    "too_long": "prompt + response longer than max_length (truncation=drop)",
}


class InvalidRow(NamedTuple):
    """An input record that was dropped: its 0-based ``source_row`` and ``reason`` ("code: detail")."""

    source_row: int
    reason: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


class InvalidDataError(ValueError):
    """Invalid rows with ``data.invalid_rows='error'``, or data that cannot be used at all."""


class _Bad(Exception):
    """Internal: a row is invalid (carries the reason code and detail)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _read_json_lines(path: str) -> list[Any]:
    """Python fallback for JSON(L) that Arrow cannot read: bad lines become ``_Bad`` records."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".json") and raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidDataError(f"{path}: not a readable JSON array ({e})") from None
        return list(data)
    rows: list[Any] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as e:
            rows.append(_Bad("bad_encoding", f"line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})"))
        except json.JSONDecodeError as e:
            rows.append(_Bad("not_json", f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})"))
    return rows


def load_rows(source: str, split: str = "train", subset: Optional[str] = None,
              revision: Optional[str] = None, cache_dir: Optional[str] = None):
    """Records of a local .json/.jsonl/.parquet file or a hub dataset: a ``datasets.Dataset``, or a
    list for JSON(L) files that Arrow cannot read (invalid UTF-8, lone-surrogate escapes), which are
    read line by line so that each bad line becomes an invalid row instead of failing the file.
    """
    import datasets

    ds_cache = os.path.join(cache_dir, "datasets") if cache_dir else None
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) or ext in LOCAL_EXTENSIONS:
        if not os.path.isfile(source):
            raise InvalidDataError(f"data file {source!r} not found")
        if ext not in LOCAL_EXTENSIONS:
            raise InvalidDataError(f"data file {source!r}: unsupported extension {ext!r}; use one of {LOCAL_EXTENSIONS}")
        builder = "parquet" if ext == ".parquet" else "json"
        try:
            return datasets.load_dataset(builder, data_files=source, split="train", cache_dir=ds_cache)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
            if builder == "parquet":
                raise InvalidDataError(f"data file {source!r} is not a readable Parquet file: {e}") from e
            log.warning("%s: Arrow cannot read it (%s); reading it line by line", source, e.__cause__ or e)
            return _read_json_lines(source)
    try:
        return datasets.load_dataset(source, subset, split=split, revision=revision, cache_dir=ds_cache)
    except Exception as e:  # network, missing dataset, bad split: re-raised with the source named
        raise InvalidDataError(
            f"data.path={source!r} is not a local file and could not be loaded as a hub dataset "
            f"(subset={subset!r}, split={split!r}, revision={revision!r}): {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Per-row validation and rendering
# ------------------------------------------------------------------------------------------------
def _check_text(value: Any, what: str, allow_empty: bool = False) -> str:
    if value is None:
        raise _Bad("missing_column", f"{what} is missing or null")
    if not isinstance(value, str):
        kind = "bytes (decode them to str first)" if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise _Bad("wrong_type", f"{what} must be a string, got {kind}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad("bad_encoding", f"{what} has an invalid character {value[e.start]!r} at index {e.start} (lone surrogate?)") from None
    if not allow_empty and not value.strip():
        raise _Bad("empty", f"{what} is empty")
    return value


def _check_messages(value: Any, what: str) -> list[dict]:
    if value is None:
        raise _Bad("missing_column", f"{what} is missing or null")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _Bad("wrong_type", f"{what} must be a list of {{role, content}} messages (conversational format), got {type(value).__name__}")
    if not value:
        raise _Bad("empty", f"{what} has no messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _Bad("wrong_type", f"{what}[{j}] must be a {{role, content}} mapping, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _Bad("bad_role", f"{what}[{j}] has role {role!r}; allowed: {list(ROLES)}")
        out.append({"role": role, "content": _check_text(m.get("content"), f"{what}[{j}].content", allow_empty=True)})
    return out


def _common_prefix_str(a: str, b: str) -> int:
    """Length of the implicit prompt of two strings: their common prefix, cut back to the start of
    the word it ends in and then before the whitespace preceding it, so both responses start with
    that whitespace (" Sure", the way BPE vocabularies spell words)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    while n > 0 and a[n - 1].isspace():
        n -= 1
    return n


def _split_standard(row: Mapping, c: DataConfig, explicit: bool) -> tuple[str, str, str]:
    chosen = _check_text(row.get(c.chosen_column), c.chosen_column)
    rejected = _check_text(row.get(c.rejected_column), c.rejected_column)
    if explicit:
        prompt = _check_text(row.get(c.prompt_column), c.prompt_column, allow_empty=True)
    else:
        n = _common_prefix_str(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if chosen == rejected:
        raise _Bad("identical", "chosen and rejected responses are identical")
    for what, text in ((c.chosen_column, chosen), (c.rejected_column, rejected)):
        if not text.strip():
            raise _Bad("empty", f"{what} response is empty after removing the shared prompt")
    return prompt, chosen, rejected


def _split_conversational(row: Mapping, c: DataConfig, has_prompt: bool) -> tuple[list, list, list]:
    chosen = _check_messages(row.get(c.chosen_column), c.chosen_column)
    rejected = _check_messages(row.get(c.rejected_column), c.rejected_column)
    raw_prompt = row.get(c.prompt_column) if has_prompt else None
    if isinstance(raw_prompt, (list, tuple)):  # explicit; tolerate responses that repeat the prompt
        prompt = _check_messages(raw_prompt, c.prompt_column)
        if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == min(len(chosen), len(rejected)):
            raise _Bad("identical", "chosen and rejected conversations are identical (or one extends the other)")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            if raw_prompt is None:
                raise _Bad("missing_column", f"{c.prompt_column!r} is missing or null and chosen/rejected share no leading messages")
            prompt = [{"role": "user", "content": _check_text(raw_prompt, c.prompt_column)}]
    for what, msgs in ((c.chosen_column, chosen), (c.rejected_column, rejected)):
        if not msgs:
            raise _Bad("empty", f"{what} has no response messages after the prompt")
        if msgs[0]["role"] != "assistant":
            raise _Bad("bad_role", f"{what} response must start with an 'assistant' message, got {msgs[0]['role']!r}")
        if not any(m["content"].strip() for m in msgs):
            raise _Bad("empty", f"{what} response is empty")
    if chosen == rejected:
        raise _Bad("identical", "chosen and rejected responses are identical")
    return prompt, chosen, rejected


def _render(tokenizer, prompt: list, responses: Sequence[list]) -> tuple[str, list[str]]:
    """Rendered prompt (with the generation prompt) and each response as the text the chat template
    appends to it."""
    from jinja2.exceptions import TemplateError

    try:
        p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        fulls = [tokenizer.apply_chat_template(prompt + r, tokenize=False) for r in responses]
    except (TemplateError, TypeError, ValueError, KeyError) as e:
        raise _Bad("template_error", f"chat template failed: {type(e).__name__}: {e}") from None
    if not all(isinstance(f, str) and f.startswith(p) for f in fulls):
        raise _Bad("template_error", "rendered prompt + response does not start with the rendered prompt")
    return p, [f[len(p):] for f in fulls]


def detect_format(rows: Sequence, c: DataConfig, source: str) -> str:
    """``"standard"`` or ``"conversational"`` from the first 100 records' chosen column (majority)."""
    if c.format != "auto":
        return c.format
    votes = {"standard": 0, "conversational": 0}
    for i, row in enumerate(rows):
        if i >= 100:
            break
        v = row.get(c.chosen_column) if isinstance(row, Mapping) else None
        if isinstance(v, str):
            votes["standard"] += 1
        elif isinstance(v, (list, tuple)):
            votes["conversational"] += 1
    if not any(votes.values()):
        raise InvalidDataError(f"{source}: cannot detect the format: none of the first rows has a string or a "
                               f"message list in column {c.chosen_column!r}; set data.format or data.chosen_column")
    return max(votes, key=votes.get)


# ------------------------------------------------------------------------------------------------
# Tokenised pairs
# ------------------------------------------------------------------------------------------------
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
        """One line: valid / total rows, invalid counts by reason and the first invalid rows."""
        s = f"{self.source}: {len(self)} valid pairs of {self.num_rows} rows ({self.format} format)"
        if self.invalid:
            counts = ", ".join(f"{k} {v}" for k, v in self.invalid_summary().items())
            rows = "; ".join(f"row {r.source_row}: {r.reason}" for r in self.invalid[:first])
            s += f"; {len(self.invalid)} invalid ({counts}); first: {rows}"
        return s


EXTRA_COLUMNS = ("is_flipped", "is_ambiguous")


def _truncate(p: list, ch: list, rj: list, c: DataConfig, bos: Optional[int]) -> tuple[list, list, list]:
    """Apply ``c.truncation`` to prompt / chosen / rejected ids (see the module docstring)."""
    if c.truncation == "drop":
        if len(p) > c.max_prompt_length:
            raise _Bad("prompt_too_long", f"prompt has {len(p)} tokens > data.max_prompt_length={c.max_prompt_length}")
        longest = len(p) + max(len(ch), len(rj))
        if longest > c.max_length:
            raise _Bad("too_long", f"prompt + response has {longest} tokens > data.max_length={c.max_length}")
        return p, ch, rj
    if len(p) > c.max_prompt_length:
        keep_bos = bos is not None and p[0] == bos
        body, m = (p[1:], c.max_prompt_length - 1) if keep_bos else (p, c.max_prompt_length)
        body = body[len(body) - m:] if c.truncation == "keep_end" else body[:m]
        p = ([bos] if keep_bos else []) + body
    room = c.max_length - len(p)
    ch, rj = ch[:room], rj[:room]
    if ch == rj:
        raise _Bad("identical", f"chosen and rejected are identical after truncation to {room} response tokens")
    return p, ch, rj


def _flag(v: Any) -> int:
    """A ground-truth flag as 1/0, or -1 when absent or not a boolean."""
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
        return int(v)
    return -1


def _tokenize(tokenizer, texts: list[str]) -> list:
    """Token ids of each text (batches of 1024); a text the tokenizer rejects gives its error message."""
    out: list = []
    for i in range(0, len(texts), 1024):
        chunk = texts[i:i + 1024]
        try:
            out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        except (TypeError, ValueError):  # isolate the offending text(s)
            for t in chunk:
                try:
                    out.append(tokenizer(t, add_special_tokens=False)["input_ids"])
                except (TypeError, ValueError) as e:
                    out.append(f"{type(e).__name__}: {e}")
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
            if isinstance(row, _Bad):
                raise row
            if not isinstance(row, Mapping):
                raise _Bad("not_a_row", f"expected a mapping of columns, got {type(row).__name__}")
            if fmt == "standard":
                triple = _split_standard(row, c, has_prompt)
            else:
                pm, cm, rm = _split_conversational(row, c, has_prompt)
                pt, (ct, rt) = _render(tokenizer, pm, (cm, rm))
                if ct == rt:
                    raise _Bad("identical", "chosen and rejected render to the same text")
                triple = (pt, ct, rt)
        except _Bad as e:
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
                raise _Bad("tokenizer_error", f"the tokenizer rejected the text: {failed[0]}")
            if bos is not None and (not p or p[0] != bos):
                p = [bos] + p
            ch = ch if ch and ch[-1] == eos else ch + [eos]
            rj = rj if rj and rj[-1] == eos else rj + [eos]
            if not p:
                raise _Bad("empty", "the prompt has no tokens and the tokenizer has no BOS token to start it")
            p, ch, rj = _truncate(p, ch, rj, c, bos)
        except _Bad as e:
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
        from .synthetic import SYNTHETIC_VERSION, make_synthetic_task

        s = c.synthetic
        task = make_synthetic_task(s.num_pairs, s.flip_fraction, s.ambiguous_fraction, s.seed, s.num_eval_pairs)
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
