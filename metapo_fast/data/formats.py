"""Preference rows in TRL's formats: reading local JSON(L)/Parquet files or hub datasets, telling the
format, checking each row and splitting it into (prompt, chosen, rejected) text.

Formats (TRL's): *standard* rows hold strings, *conversational* rows lists of ``{"role", "content"}``
messages rendered with ``tokenizer.apply_chat_template``. *Explicit* rows have a prompt column;
*implicit* rows only chosen/rejected, whose shared prefix is the prompt (strings: the common prefix
cut back to the last whitespace, so no response starts mid-word; messages: the common leading
messages). A conversational row whose prompt is a string (HuggingFaceH4/ultrafeedback_binarized)
takes the shared leading messages as prompt, or the string as one user message if there are none.

A row that cannot be used raises :class:`RowError` (reason code and detail, e.g. ``empty: chosen is
empty``); :mod:`.pairs` records it as an :class:`InvalidRow` and goes on. Tokenising, truncation and
the cache live in :mod:`.pairs`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from ..config import DataConfig

__all__ = ["InvalidRow", "InvalidDataError", "RowError", "load_rows", "detect_format", "split_row", "INVALID_REASONS",
           "ROLES"]

log = logging.getLogger(__name__)
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


class RowError(Exception):
    """A row is invalid: carries the reason code (a key of INVALID_REASONS) and a detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _read_json_lines(path: str) -> list[Any]:
    """Python fallback for JSON(L) that Arrow cannot read: bad lines become ``RowError`` records."""
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
            rows.append(RowError("bad_encoding", f"line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})"))
        except json.JSONDecodeError as e:
            rows.append(RowError("not_json", f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})"))
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
            raise InvalidDataError(f"data.path: file {source!r} not found")
        if ext not in LOCAL_EXTENSIONS:
            raise InvalidDataError(f"data file {source!r}: unsupported extension {ext!r}; use one of {LOCAL_EXTENSIONS}")
        builder = "parquet" if ext == ".parquet" else "json"
        # Arrow's own complaint about a bad line would be logged (twice) before our report: the
        # line-by-line reader below names each bad line instead
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
        try:
            return datasets.load_dataset(builder, data_files=source, split="train", cache_dir=ds_cache)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
            if builder == "parquet":
                raise InvalidDataError(f"data file {source!r} is not a readable Parquet file: {e}") from e
            log.debug("%s: Arrow cannot read it (%s); reading it line by line", source, e.__cause__ or e)
            return _read_json_lines(source)
        finally:
            datasets.logging.set_verbosity(verbosity)
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
        raise RowError("missing_column", f"{what} is missing or null")
    if not isinstance(value, str):
        kind = "bytes (decode them to str first)" if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise RowError("wrong_type", f"{what} must be a string, got {kind}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError("bad_encoding", f"{what} has an invalid character {value[e.start]!r} at index {e.start} (lone surrogate?)") from None
    if not allow_empty and not value.strip():
        raise RowError("empty", f"{what} is empty")
    return value


def _check_messages(value: Any, what: str) -> list[dict]:
    if value is None:
        raise RowError("missing_column", f"{what} is missing or null")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise RowError("wrong_type", f"{what} must be a list of {{role, content}} messages (conversational format), got {type(value).__name__}")
    if not value:
        raise RowError("empty", f"{what} has no messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise RowError("wrong_type", f"{what}[{j}] must be a {{role, content}} mapping, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError("bad_role", f"{what}[{j}] has role {role!r}; allowed: {list(ROLES)}")
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
        raise RowError("identical", "chosen and rejected responses are identical")
    for what, text in ((c.chosen_column, chosen), (c.rejected_column, rejected)):
        if not text.strip():
            raise RowError("empty", f"{what} response is empty after removing the shared prompt")
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
            raise RowError("identical", "chosen and rejected conversations are identical (or one extends the other)")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            if raw_prompt is None:
                raise RowError("missing_column", f"{c.prompt_column!r} is missing or null and chosen/rejected share no leading messages")
            prompt = [{"role": "user", "content": _check_text(raw_prompt, c.prompt_column)}]
    for what, msgs in ((c.chosen_column, chosen), (c.rejected_column, rejected)):
        if not msgs:
            raise RowError("empty", f"{what} has no response messages after the prompt")
        if msgs[0]["role"] != "assistant":
            raise RowError("bad_role", f"{what} response must start with an 'assistant' message, got {msgs[0]['role']!r}")
        if not any(m["content"].strip() for m in msgs):
            raise RowError("empty", f"{what} response is empty")
    if chosen == rejected:
        raise RowError("identical", "chosen and rejected responses are identical")
    return prompt, chosen, rejected


def _render(tokenizer, prompt: list, responses: Sequence[list]) -> tuple[str, list[str]]:
    """Rendered prompt (with the generation prompt) and each response as the text the chat template
    appends to it."""
    from jinja2.exceptions import TemplateError

    try:
        p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        fulls = [tokenizer.apply_chat_template(prompt + r, tokenize=False) for r in responses]
    except (TemplateError, TypeError, ValueError, KeyError) as e:
        raise RowError("template_error", f"chat template failed: {type(e).__name__}: {e}") from None
    if not all(isinstance(f, str) and f.startswith(p) for f in fulls):
        raise RowError("template_error", "rendered prompt + response does not start with the rendered prompt")
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


def split_row(row: Any, c: DataConfig, tokenizer, fmt: str, has_prompt: bool) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text for one record of format ``fmt``; raises :class:`RowError`.
    Conversational rows are rendered with the tokenizer's chat template."""
    if isinstance(row, RowError):  # a line that could not even be parsed
        raise row
    if not isinstance(row, Mapping):
        raise RowError("not_a_row", f"expected a mapping of columns, got {type(row).__name__}")
    if fmt == "standard":
        return _split_standard(row, c, has_prompt)
    pm, cm, rm = _split_conversational(row, c, has_prompt)
    pt, (ct, rt) = _render(tokenizer, pm, (cm, rm))
    if ct == rt:
        raise RowError("identical", "chosen and rejected render to the same text")
    return pt, ct, rt
