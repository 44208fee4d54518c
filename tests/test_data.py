"""metapo_fast.data / batching / synthetic: TRL formats from JSONL and Parquet, hostile rows, labels,
identity (pair_id -> source_row), validation split, sampler, tokenisation cache."""
import json
import logging

import numpy as np
import pytest
import torch

from metapo_fast.config import DataConfig, SyntheticConfig
from metapo_fast.data import (
    IGNORE_INDEX, InvalidDataError, PairSampler, PreferenceCollator, PreferenceDataset, build_datasets,
    load_preference_data, load_rows, split_validation,
)
from metapo_fast.data.synthetic import build_char_tokenizer, make_synthetic_task

TOK = build_char_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def dec(ids):
    return TOK.decode([int(i) for i in ids])


def cfg(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return DataConfig(**kw)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


# Each TRL format, and the prompt / chosen / rejected text the pipeline must produce for it.
HUMAN = "\n\nHuman: 3+4?\n\nAssistant:"
FORMATS = {
    "standard_explicit": ({"prompt": "3+4=", "chosen": "7", "rejected": "8"}, ("<bos>3+4=", "7<eos>", "8<eos>")),
    "standard_implicit": ({"chosen": HUMAN + " It is 7", "rejected": HUMAN + " It is 8"},
                          ("<bos>" + HUMAN + " It is", " 7<eos>", " 8<eos>")),
    "conversational_explicit": ({"prompt": [{"role": "system", "content": "Be brief."}, user("3+4=")],
                                 "chosen": [asst("7")], "rejected": [asst("8")]},
                                ("<bos><|system|>Be brief.\n<|user|>3+4=\n<|assistant|>", "7<eos>", "8<eos>")),
    "conversational_implicit": ({"chosen": [user("3+4="), asst("7")], "rejected": [user("3+4="), asst("8")]},
                                ("<bos><|user|>3+4=\n<|assistant|>", "7<eos>", "8<eos>")),
    # HuggingFaceH4/ultrafeedback_binarized: prompt string, full conversations as responses
    "conversational_prompt_string": ({"prompt": "3+4=", "chosen": [user("3+4="), asst("7")], "rejected": [user("3+4="), asst("8")]},
                                     ("<bos><|user|>3+4=\n<|assistant|>", "7<eos>", "8<eos>")),
}


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet], ids=["jsonl", "parquet"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_trl_formats_from_files(tmp_path, writer, fmt):
    row, (prompt, chosen, rejected) = FORMATS[fmt]
    other = json.loads(json.dumps(row))  # a second, different pair
    path = writer(tmp_path / ("d.jsonl" if writer is write_jsonl else "d.parquet"), [row, other])
    pairs = load_preference_data(cfg(tmp_path, path=path, cache=False), TOK)
    assert pairs.format == fmt.split("_")[0]
    assert len(pairs) == 2 and not pairs.invalid and pairs.source_rows.tolist() == [0, 1]
    assert (dec(pairs.prompt_ids[0]), dec(pairs.chosen_ids[0]), dec(pairs.rejected_ids[0])) == (prompt, chosen, rejected)


def test_implicit_prompt_extraction(tmp_path):
    rows = [
        {"chosen": "Q: hi A: Sure thing", "rejected": "Q: hi A: Sorry"},       # diverge mid-word: back to " S"
        {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: yes please"},          # one extends the other
        {"chosen": "7", "rejected": "8"},                                       # nothing shared: empty prompt
        {"chosen": [user("a"), asst("b"), user("c"), asst("d")], "rejected": [user("a"), asst("b"), user("c"), asst("e")]},
    ]
    pairs = load_preference_data(cfg(tmp_path, cache=False), TOK, rows=rows[:3])
    got = [(dec(p), dec(c), dec(r)) for p, c, r in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)]
    assert got == [("<bos>Q: hi A:", " Sure thing<eos>", " Sorry<eos>"),
                   ("<bos>Q: hi A:", " yes<eos>", " yes please<eos>"),
                   ("<bos>", "7<eos>", "8<eos>")]
    conv = load_preference_data(cfg(tmp_path, cache=False), TOK, rows=rows[3:])
    assert dec(conv.prompt_ids[0]) == "<bos><|user|>a\n<|assistant|>b<eos><|user|>c\n<|assistant|>"
    assert (dec(conv.chosen_ids[0]), dec(conv.rejected_ids[0])) == ("d<eos>", "e<eos>")


def test_labels_shifted_and_masked_by_hand():
    """Pair 0: prompt [2, 10, 11], chosen [20, 3], rejected [21, 22, 3]; pair 1: prompt [2, 12],
    chosen [23, 3], rejected [24, 3]. Longest sequence: 3 + 3 = 6 tokens -> T = 6.
    labels[t] = input_ids[t+1] where t+1 is a response token, -100 elsewhere."""
    a = np.asarray
    items = [
        {"pair_id": 5, "source_row": 9, "prompt_ids": a([2, 10, 11]), "chosen_ids": a([20, 3]), "rejected_ids": a([21, 22, 3])},
        {"pair_id": 6, "source_row": 12, "prompt_ids": a([2, 12]), "chosen_ids": a([23, 3]), "rejected_ids": a([24, 3])},
    ]
    b = PreferenceCollator(pad_token_id=0)(items)
    X = IGNORE_INDEX
    assert b["input_ids"].tolist() == [[2, 10, 11, 20, 3, 0], [2, 12, 23, 3, 0, 0], [2, 10, 11, 21, 22, 3], [2, 12, 24, 3, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[X, X, 20, 3, X, X], [X, 23, 3, X, X, X], [X, X, 21, 22, 3, X], [X, 24, 3, X, X, X]]
    assert b["pair_ids"].tolist() == [5, 6] and b["source_rows"].tolist() == [9, 12]
    assert all(v.dtype == torch.int64 for v in b.values())
    assert PreferenceCollator(0, pad_to_multiple_of=8)(items)["input_ids"].shape == (4, 8)
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)


def test_labels_agree_with_a_causal_lm_shift(tmp_path):
    """The labels of a real batch equal HF's convention (logits[:, t] predicts input_ids[:, t+1])
    restricted to response tokens: their sum of log-probs from uniform logits is -n log V."""
    pairs = load_preference_data(cfg(tmp_path, cache=False), TOK, rows=make_synthetic_task(8, 0.0, 0.0, 1).train_rows)
    ds = PreferenceDataset(pairs)
    b = PreferenceCollator(PAD)([ds[i] for i in range(4)])
    ids, lab = b["input_ids"], b["labels"]
    m = lab != IGNORE_INDEX
    assert torch.equal(lab[:, :-1][m[:, :-1]], ids[:, 1:][m[:, :-1]])
    n_resp = [len(ds[i]["chosen_ids"]) for i in range(4)] + [len(ds[i]["rejected_ids"]) for i in range(4)]
    assert m.sum(1).tolist() == n_resp


def test_pair_id_to_source_row_after_drops_and_split(tmp_path):
    rows = []
    for i in range(40):
        r = {"prompt": f"{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}
        if i % 7 == 3:
            r["rejected"] = r["chosen"]            # identical -> dropped
        if i % 11 == 5:
            r["chosen"] = None                     # missing -> dropped
        rows.append(r)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    c = cfg(tmp_path, path=path, val_fraction=0.2, val_split="random")
    pairs = load_preference_data(c, TOK)
    dropped = sorted({i for i in range(40) if i % 7 == 3 or i % 11 == 5})
    assert [r.source_row for r in pairs.invalid] == dropped
    train, val = build_datasets(pairs, None, c)
    assert len(val) == round(0.2 * len(pairs)) and len(train) + len(val) == 40 - len(dropped)
    assert set(train.source_rows) | set(val.source_rows) == set(range(40)) - set(dropped)
    for ds in (train, val):
        for pid in range(len(ds)):
            item = ds[pid]
            assert item["pair_id"] == pid
            src = item["source_row"]
            assert dec(item["chosen_ids"]) == f"good {src}<eos>" and dec(item["rejected_ids"]) == f"bad {src}<eos>"
    assert np.all(np.diff(train.source_rows) > 0)  # pair ids follow file order: stable
    with pytest.raises(IndexError):
        train[len(train)]
    with pytest.raises(IndexError):
        train[-1]


# ---------------------------------------------------------------------------------------------
# Hostile data
# ---------------------------------------------------------------------------------------------
LONG = "x" * 100_000
HOSTILE_STANDARD = [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, None),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "missing_column"),
    ({"prompt": "p", "chosen": "a"}, "missing_column"),
    ({"prompt": "p", "chosen": 42, "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "b"}, "empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": "a\ud800", "rejected": "b"}, "bad_encoding"),
    ({"prompt": "p", "chosen": b"bytes", "rejected": "b"}, "wrong_type"),
    ({"prompt": LONG, "chosen": "a", "rejected": "b"}, "prompt_too_long"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "extra": [1, {"x": None}], "more": None}, None),
    (["p", "a", "b"], "not_a_row"),
    (None, "not_a_row"),
    ({"prompt": "p", "chosen": [asst("a")], "rejected": "b"}, "wrong_type"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing_column"),
    ({"prompt": "p", "chosen": LONG, "rejected": "b"}, "too_long"),
    ({"prompt": 3.5, "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": "a", "rejected": float("nan")}, "wrong_type"),
    ({"prompt": "", "chosen": "c", "rejected": "d"}, None),
]
HOSTILE_CONV = [
    ({"prompt": [user("q")], "chosen": [asst("a")], "rejected": [asst("b")]}, None),
    ({"prompt": [user("q")], "chosen": [{"role": "robot", "content": "a"}], "rejected": [asst("b")]}, "bad_role"),
    ({"prompt": [{"role": None, "content": "q"}], "chosen": [asst("a")], "rejected": [asst("b")]}, "bad_role"),
    ({"prompt": [user("q")], "chosen": [user("a")], "rejected": [asst("b")]}, "bad_role"),
    ({"prompt": [user("q")], "chosen": [{"role": "assistant"}], "rejected": [asst("b")]}, "missing_column"),
    ({"prompt": [user("q")], "chosen": [{"role": "assistant", "content": 7}], "rejected": [asst("b")]}, "wrong_type"),
    ({"prompt": [user("q")], "chosen": ["a"], "rejected": [asst("b")]}, "wrong_type"),
    ({"prompt": [user("q")], "chosen": [], "rejected": [asst("b")]}, "empty"),
    ({"prompt": [user("q")], "chosen": [asst("a")], "rejected": [asst("a")]}, "identical"),
    ({"prompt": [user("q\ud800")], "chosen": [asst("a")], "rejected": [asst("b")]}, "bad_encoding"),
    ({"prompt": [user("q")], "chosen": "a", "rejected": [asst("b")]}, "wrong_type"),
    ({"prompt": [user("q")], "chosen": [asst("")], "rejected": [asst("b")]}, "empty"),
    ({"chosen": [asst("a")], "rejected": [asst("b")]}, "missing_column"),
    ({"prompt": [user("q")], "chosen": [asst("a")], "rejected": [asst("b")], "meta": {"k": 1}}, None),
]


@pytest.mark.parametrize("table", [HOSTILE_STANDARD, HOSTILE_CONV], ids=["standard", "conversational"])
def test_hostile_rows_each_reported_with_row_and_reason(tmp_path, table, caplog):
    rows = [r for r, _ in table]
    c = cfg(tmp_path, truncation="drop", cache=False, format="standard" if table is HOSTILE_STANDARD else "conversational")
    with caplog.at_level(logging.WARNING, logger="metapo_fast.data"):
        pairs = load_preference_data(c, TOK, rows=rows, source_name="hostile.jsonl")
    expected = [(i, code) for i, (_, code) in enumerate(table) if code is not None]
    assert [(r.source_row, r.code) for r in pairs.invalid] == expected
    assert all(len(r.reason) > len(r.code) + 5 for r in pairs.invalid)  # a detail, not just a code
    assert pairs.source_rows.tolist() == [i for i, (_, code) in enumerate(table) if code is None]
    summary = pairs.invalid_summary()
    assert sum(summary.values()) == len(expected) and summary == {k: [c for _, c in expected].count(k) for k in summary}
    assert "hostile.jsonl" in caplog.text and "invalid" in caplog.text
    pairs.save_invalid(str(tmp_path / "invalid.jsonl"))
    saved = [json.loads(line) for line in (tmp_path / "invalid.jsonl").read_text().splitlines()]
    assert [(r["source_row"], r["reason"]) for r in saved] == [tuple(r) for r in pairs.invalid]


class _PickyTokenizer:
    """The char tokenizer, except that it raises on any text containing "BAD"."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, texts, **kw):
        if any("BAD" in t for t in ([texts] if isinstance(texts, str) else texts)):
            raise ValueError("picky tokenizer")
        return self.tok(texts, **kw)


def test_template_and_tokenizer_errors_are_per_row(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = tok.chat_template.replace(
        "{{ bos_token }}", "{{ bos_token }}{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom!') }}{% endif %}{% endfor %}")
    rows = [{"prompt": [user("q")], "chosen": [asst("boom")], "rejected": [asst("b")]},
            {"prompt": [user("q")], "chosen": [asst("a")], "rejected": [asst("b")]}]
    pairs = load_preference_data(cfg(tmp_path, cache=False), tok, rows=rows)
    assert [(r.source_row, r.code) for r in pairs.invalid] == [(0, "template_error")] and "boom!" in pairs.invalid[0].reason
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "BAD", "rejected": "b"},
            {"prompt": "p", "chosen": "c", "rejected": "d"}]
    pairs = load_preference_data(cfg(tmp_path, cache=False), _PickyTokenizer(TOK), rows=rows)
    assert [(r.source_row, r.code) for r in pairs.invalid] == [(1, "tokenizer_error")] and "picky" in pairs.invalid[0].reason
    assert pairs.source_rows.tolist() == [0, 2]
    plain = build_char_tokenizer()
    plain.chat_template = None
    with pytest.raises(InvalidDataError, match="chat template"):
        load_preference_data(cfg(tmp_path, cache=False), plain, rows=[FORMATS["conversational_implicit"][0]])


def test_long_prompt_is_truncated_keeping_bos(tmp_path):
    rows = [{"prompt": "abc" + LONG + "xyz", "chosen": "a" * 100, "rejected": "b"}]
    for mode, tail in (("keep_end", "xyz"), ("keep_start", "abc")):
        pairs = load_preference_data(cfg(tmp_path, truncation=mode, cache=False), TOK, rows=rows)
        p, ch = pairs.prompt_ids[0], pairs.chosen_ids[0]
        assert len(p) == 32 and p[0] == BOS and len(p) + len(ch) == 64
        assert dec(p).endswith(tail) if mode == "keep_end" else dec(p).startswith("<bos>" + tail)
        assert dec(ch) == "a" * 32  # responses keep their start (EOS cut off with the rest)


def test_hostile_jsonl_file_read_row_by_row(tmp_path):
    """Invalid UTF-8 and lone-surrogate escapes make Arrow reject the whole file; the fallback reader
    reports each bad line instead, with record indices that skip blank lines like Arrow does."""
    lines = [
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode(),
        json.dumps({"prompt": "p", "chosen": "a\ud800", "rejected": "b"}).encode(),  # "\ud800" escape
        b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "b"}',                    # invalid UTF-8
        b'{"prompt": "p", "chosen": ',                                                # truncated JSON
        b"",
        b"[1, 2]",
        json.dumps({"prompt": "p2", "chosen": "c", "rejected": "d", "x": 1}).encode(),
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    pairs = load_preference_data(cfg(tmp_path, path=str(path)), TOK)
    assert [(r.source_row, r.code) for r in pairs.invalid] == [(1, "bad_encoding"), (2, "bad_encoding"), (3, "not_json"), (4, "not_a_row")]
    assert "line 3" in pairs.invalid[1].reason and "line 4" in pairs.invalid[2].reason
    assert pairs.source_rows.tolist() == [0, 5]
    assert dec(pairs.prompt_ids[1]) == "<bos>p2"


def test_invalid_rows_error_names_file_and_rows(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": 5, "rejected": "b"}]
    path = write_jsonl(tmp_path / "bad_rows.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_preference_data(cfg(tmp_path, path=path, invalid_rows="error"), TOK)
    msg = str(e.value)
    assert isinstance(e.value, InvalidDataError)
    # rows counted from 1, as the file's lines are: the identical pair is line 3, the int response line 4
    assert "bad_rows.jsonl" in msg and "row 3: identical" in msg and "row 4: wrong_type" in msg and "invalid_rows" in msg
    # the same from the cache (second load) still fails
    with pytest.raises(InvalidDataError, match="row 3: identical"):
        load_preference_data(cfg(tmp_path, path=path, invalid_rows="error"), TOK)


def test_unusable_sources_fail_clearly(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    with pytest.raises(InvalidDataError, match="missing.jsonl.*not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(InvalidDataError, match="unsupported extension"):
        load_rows(str(tmp_path / "d.csv"))
    path = write_jsonl(tmp_path / "nums.jsonl", [{"chosen": 1, "rejected": 2}])
    with pytest.raises(InvalidDataError, match="cannot detect the format"):
        load_preference_data(cfg(tmp_path, path=path), TOK)
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(InvalidDataError, match="no valid pairs"):
        load_preference_data(cfg(tmp_path, path=path), TOK)
    path = write_parquet(tmp_path / "bytes.parquet", [{"prompt": "p", "chosen": b"a", "rejected": "b"}] * 2)
    with pytest.raises(InvalidDataError) as e:
        load_preference_data(cfg(tmp_path, path=path, format="standard"), TOK)
    assert "bytes.parquet" in str(e.value) and "row 1: wrong_type" in str(e.value) and "bytes" in str(e.value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InvalidDataError, match="someorg/no-such-dataset"):
        load_rows("someorg/no-such-dataset")


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def test_tokenisation_cache_hit_and_misses(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20)] + [{"prompt": "q", "chosen": None, "rejected": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first = load_preference_data(cfg(tmp_path, path=path), TOK)
    second = load_preference_data(cfg(tmp_path, path=path), TOK)
    assert not first.cache_hit and second.cache_hit and first.cache_path == second.cache_path
    assert second.invalid == first.invalid and np.array_equal(second.source_rows, first.source_rows)
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(first, name), getattr(second, name)))
    other = load_preference_data(cfg(tmp_path, path=path, max_length=48), TOK)  # max_length changed
    assert not other.cache_hit and other.cache_path != first.cache_path
    assert not load_preference_data(cfg(tmp_path, path=path, truncation="drop"), TOK).cache_hit
    write_jsonl(tmp_path / "d.jsonl", rows[:10])  # the file bytes changed
    changed = load_preference_data(cfg(tmp_path, path=path), TOK)
    assert not changed.cache_hit and len(changed) == 10
    with open(first.cache_path, "wb") as fh:  # a corrupt cache file is rebuilt, with a warning
        fh.write(b"garbage")
    write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="metapo_fast.data"):
        rebuilt = load_preference_data(cfg(tmp_path, path=path), TOK)
    assert not rebuilt.cache_hit and len(rebuilt) == 20 and "unreadable" in caplog.text


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------
def test_stratified_split_keeps_the_margin_distribution():
    rng = np.random.default_rng(0)
    margins = np.concatenate([rng.normal(-3, 0.5, 700), rng.normal(4, 2.0, 300)])  # skewed, bimodal
    train, val = split_validation(margins, 0.1, "stratified", num_bins=10, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    edges = np.quantile(margins, np.linspace(0, 1, 11))
    counts = np.histogram(margins[val], bins=edges)[0]
    assert counts.tolist() == [10] * 10  # every quantile bin represented, proportionally
    again = split_validation(margins, 0.1, "stratified", num_bins=10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))
    assert not np.array_equal(split_validation(margins, 0.1, "stratified", 10, seed=4)[1], val)
    # a plain random split of the same size misses bins far more often than never
    rnd = split_validation(None, 0.1, "random", seed=3, num_pairs=1000)[1]
    assert len(rnd) == 100 and np.histogram(margins[rnd], bins=edges)[0].tolist() != [10] * 10


def test_small_split_and_errors():
    margins = np.arange(100.0)[::-1]
    _, val = split_validation(margins, 0.03, "stratified", num_bins=10, seed=0)
    assert len(val) == 3 and sorted(np.digitize(margins[val], [33.5, 66.5]).tolist()) == [0, 1, 2]  # one per tercile
    for method in ("random", "stratified"):  # no validation pairs: no margins needed
        train, val = split_validation(None, 0.0, method, num_pairs=10)
        assert len(val) == 0 and train.tolist() == list(range(10))
    with pytest.raises(ValueError, match="ref_margins"):
        split_validation(None, 0.1, "stratified", num_pairs=10)
    with pytest.raises(ValueError, match="non-finite"):
        split_validation(np.array([0.0, np.nan, 1.0, 2.0]), 0.5, "stratified")
    with pytest.raises(ValueError, match="no training pairs"):
        split_validation(np.zeros(2), 0.9, "stratified")


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
def test_sampler_shards_disjointly_across_two_ranks():
    n, per = 103, 4
    ranks = [PairSampler(n, per, world_size=2, rank=r, seed=5) for r in range(2)]
    assert ranks[0].batches_per_epoch == 12 == len(ranks[0])
    for epoch in range(2):
        b0, b1 = list(ranks[0]), list(ranks[1])
        assert len(b0) == len(b1) == 12 and all(len(b) == per for b in b0 + b1)
        seen = [i for x, y in zip(b0, b1) for i in x + y]
        assert len(seen) == len(set(seen)) == 96  # disjoint; together each global batch once
        perm = ranks[0].permutation(epoch)
        assert seen == perm[:96].tolist()
    assert ranks[0].epoch == 2
    assert not np.array_equal(ranks[0].permutation(0), ranks[0].permutation(1))


@pytest.mark.parametrize("consumed", [0, 5, 12, 15])
def test_sampler_resumes_at_the_exact_position(consumed):
    ref = PairSampler(50, 4, seed=1)
    stream = [b for _ in range(3) for b in ref]  # 3 epochs of 12 batches
    a = PairSampler(50, 4, seed=1)
    got, it = [], iter(a)
    while len(got) < consumed:
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    b = PairSampler(50, 4, seed=1)
    b.load_state_dict(state)
    while b.epoch < 3:
        got.extend(b)
    assert got == stream
    with pytest.raises(ValueError, match="seed"):
        PairSampler(50, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_pairs"):
        PairSampler(60, 4, seed=1).load_state_dict(state)


def test_sampler_as_dataloader_batch_sampler(tmp_path):
    pairs = load_preference_data(cfg(tmp_path, cache=False), TOK, rows=make_synthetic_task(40, 0.0, 0.0, 2).train_rows)
    ds = PreferenceDataset(pairs)
    sampler = PairSampler(len(ds), 8, seed=0)
    expected = [list(b) for b in PairSampler(len(ds), 8, seed=0)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=PreferenceCollator(PAD), num_workers=0)
    for k, batch in enumerate(loader, 1):
        assert batch["pair_ids"].tolist() == expected[k - 1] and batch["input_ids"].shape[0] == 16
        assert sampler.state_dict()["offset"] == k  # yielded == consumed with num_workers=0
        if k == 3:
            break


def test_sampler_rejects_bad_setups():
    with pytest.raises(ValueError, match="global batch"):
        PairSampler(7, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        PairSampler(100, 4, world_size=2, rank=2)


# ---------------------------------------------------------------------------------------------
# Synthetic task
# ---------------------------------------------------------------------------------------------
def test_synthetic_task_ground_truth_and_determinism(tmp_path):
    task = make_synthetic_task(1000, flip_fraction=0.3, ambiguous_fraction=0.1, seed=4, num_eval_pairs=200)
    rows = task.train_rows
    assert sum(r["is_flipped"] for r in rows) == 300 and sum(r["is_ambiguous"] for r in rows) == 100
    for r in rows:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert r["answer"] == str(a + b) and r["chosen"] != r["rejected"]
        assert not (r["is_flipped"] and r["is_ambiguous"])
        assert (r["chosen"] == r["answer"]) == (not r["is_flipped"] and not r["is_ambiguous"])
        assert (r["rejected"] == r["answer"]) == r["is_flipped"]
    assert all(r["chosen"] == r["answer"] and not r["is_flipped"] for r in task.eval_rows)
    assert len(task.sft_rows) == 100 and {"prompt": "3+4=", "completion": "7"} in task.sft_rows
    assert make_synthetic_task(1000, 0.3, 0.1, seed=4, num_eval_pairs=200) == task
    assert make_synthetic_task(1000, 0.3, 0.1, seed=5, num_eval_pairs=200).train_rows != rows
    with pytest.raises(ValueError, match="flip_fraction"):
        make_synthetic_task(10, 0.7, 0.5)
    # through the pipeline: ground truth follows the pairs through the split
    c = cfg(tmp_path, synthetic=SyntheticConfig(num_pairs=300, flip_fraction=0.3, num_eval_pairs=50), max_length=16, max_prompt_length=8)
    pairs = load_preference_data(c, TOK)
    train, val = build_datasets(pairs, np.linspace(-1, 1, len(pairs)), c)
    assert len(val) == 9 and train.column("is_flipped").sum() + val.column("is_flipped").sum() == 90
    src = make_synthetic_task(300, 0.3, 0.0, 0, 50).train_rows
    assert all(bool(train.column("is_flipped")[k]) == src[train.source_rows[k]]["is_flipped"] for k in range(len(train)))
    evaluation = load_preference_data(c, TOK, which="eval")
    assert len(evaluation) == 50 and evaluation.extra["is_flipped"].sum() == 0


def test_oracle_labels_are_the_same_pairs_with_their_true_labels(tmp_path):
    """data.synthetic.oracle_labels: the clean-label upper bound trains on the same draws, flipped
    pairs swapped back and ambiguous ones (no true label) removed; the cache key changes with it."""
    noisy = make_synthetic_task(500, 0.3, 0.1, seed=3, num_eval_pairs=50)
    oracle = make_synthetic_task(500, 0.3, 0.1, seed=3, num_eval_pairs=50, oracle_labels=True)
    kept = [r for r in noisy.train_rows if not r["is_ambiguous"]]
    assert len(oracle.train_rows) == len(kept) == 450 and oracle.eval_rows == noisy.eval_rows
    for n, o in zip(kept, oracle.train_rows):
        assert o["prompt"] == n["prompt"] and o["chosen"] == o["answer"] and not o["is_flipped"]
        assert {o["chosen"], o["rejected"]} == {n["chosen"], n["rejected"]}
    assert sum(n["chosen"] != o["chosen"] for n, o in zip(kept, oracle.train_rows)) == 150
    c = cfg(tmp_path, synthetic=SyntheticConfig(num_pairs=200, flip_fraction=0.3, oracle_labels=True, num_eval_pairs=20),
            max_length=16, max_prompt_length=8)
    pairs = load_preference_data(c, TOK)
    assert len(pairs) == 200 and pairs.extra["is_flipped"].sum() == 0
    c.synthetic.oracle_labels = False
    assert load_preference_data(c, TOK).extra["is_flipped"].sum() == 60  # not the cached oracle rows


def test_char_tokenizer_and_chat_template():
    ids = TOK("3+4=\n<eos>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and ids[-1] == EOS and TOK.decode(ids) == "3+4=\n<eos>"
    assert TOK("é", add_special_tokens=False)["input_ids"] == [TOK.unk_token_id]
    text = TOK.apply_chat_template([user("3+4="), asst("7")], tokenize=False)
    assert text == "<bos><|user|>3+4=\n<|assistant|>7<eos>"
    with pytest.raises(Exception, match="unknown role"):
        TOK.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    assert len(TOK) == 104 and (PAD, TOK.unk_token_id, BOS, EOS) == (0, 1, 2, 3)


def test_default_config_end_to_end(tmp_path):
    """configs/default.yaml through the whole pipeline: data, split, sampler, collator."""
    import os

    from metapo_fast.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, "configs", "default.yaml"), [f"data.cache_dir={tmp_path}"])
    pairs = load_preference_data(c.data, TOK)
    assert len(pairs) == c.data.synthetic.num_pairs and not pairs.invalid
    assert max(len(p) + max(len(a), len(b)) for p, a, b in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)) <= c.data.max_length
    margins = np.random.default_rng(0).normal(size=len(pairs))  # stands in for the reference margins
    train, val = build_datasets(pairs, margins, c.data)
    assert len(val) == 60 and len(train) == 1940
    sampler = PairSampler(len(train), c.train.per_device_batch_size, seed=c.train.seed)
    assert sampler.batches_per_epoch == 60
    batch = PreferenceCollator(PAD)([train[i] for i in next(iter(sampler))])
    assert batch["input_ids"].shape[0] == 64 and batch["input_ids"].shape[1] <= c.data.max_length
    pairs.save_invalid(str(tmp_path / "invalid.jsonl"))
    assert (tmp_path / "invalid.jsonl").read_text() == ""


def test_true_labels_view_swaps_back_only_the_flipped_pairs():
    import numpy as np

    from metapo_fast.data.batches import PreferenceDataset, TrueLabels
    from metapo_fast.data import TokenizedPairs

    i32 = lambda *v: np.array(v, np.int32)  # noqa: E731
    pairs = TokenizedPairs(source="synthetic", prompt_ids=[i32(1), i32(2), i32(3)], chosen_ids=[i32(10), i32(20), i32(30)],
                           rejected_ids=[i32(11), i32(21), i32(31)], source_rows=np.arange(3),
                           extra={"is_flipped": np.array([0, 1, 1])})
    view = TrueLabels(PreferenceDataset(pairs, [2, 0, 1]))
    got = [(int(view[k]["chosen_ids"][0]), int(view[k]["rejected_ids"][0])) for k in range(3)]
    assert got == [(31, 30), (10, 11), (21, 20)] and len(view) == 3


def test_prompt_groups_number_identical_prompts_in_pair_id_order():
    from metapo_fast.data import TokenizedPairs

    i32 = lambda *v: np.array(v, np.int32)  # noqa: E731
    prompts = [i32(1, 2), i32(3), i32(1, 2), i32(1), i32(3)]
    pairs = TokenizedPairs(source="x", prompt_ids=prompts, chosen_ids=[i32(9)] * 5, rejected_ids=[i32(8)] * 5,
                           source_rows=np.arange(5))
    assert PreferenceDataset(pairs).prompt_groups().tolist() == [0, 1, 0, 2, 1]
    # pair_id order of a split: pairs 4, 0, 2, 3 -> prompts (3), (1 2), (1 2), (1)
    assert PreferenceDataset(pairs, [4, 0, 2, 3]).prompt_groups().tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("case", ["missing_file", "invalid_rows", "too_few_pairs"])
def test_train_data_errors_are_one_line_exit_2_and_leave_no_run_directory(tmp_path, case, capsys):
    """A data error at start-up: exit code 2, one line on stderr naming the file and the 1-based
    rows (no traceback, no datasets/Arrow noise, the report once), and no empty run directory."""
    from metapo_fast.train.cli import main as train

    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = tmp_path / "pairs.jsonl"
    if case == "missing_file":
        path = tmp_path / "missing.jsonl"
    elif case == "invalid_rows":
        path.write_text(json.dumps(good) + "\nnot json\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    else:
        write_jsonl(path, [good] * 3)
    out = tmp_path / "run"
    rc = train([f"data.path={path}", f"train.output_dir={out}", "train.sft_warmup_steps=0", "data.invalid_rows=error",
                "data.val_fraction=0", "meta.enabled=false", "train.max_steps=1"])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and "Generating train split" not in l]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("metapo_fast.train: invalid data: "), err
    assert "Traceback" not in err and "Arrow" not in err
    assert not out.exists()
    if case == "missing_file":
        assert "data.path" in lines[0] and "missing.jsonl" in lines[0]
    elif case == "invalid_rows":
        assert "pairs.jsonl" in lines[0] and "row 2: not_json: line 2" in lines[0] and "row 3: missing_column" in lines[0]
    else:
        assert "3 training pairs are fewer than one global batch" in lines[0] and "per_device_batch_size" in lines[0]


def test_tokenising_long_data_shows_a_progress_bar_on_a_terminal(monkeypatch):
    import io
    import sys

    from metapo_fast.data import pairs

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(pairs, "PROGRESS_MIN_TEXTS", 3000)
    for n, shown in ((2999, False), (3000, True)):
        err = Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        assert len(pairs._tokenize(TOK, ["ab"] * n)) == n
        assert ("tokenising: 100%" in err.getvalue()) == shown
