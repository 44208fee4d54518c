"""benchmarks.counters on a tiny shape (V=2003, Llama-3-8B's chunking decisions): the keys each row
carries, and the targets the fused loss meets (docs: README "How the fused loss works")."""
import json

import pytest

from benchmarks import counters

KEYS = {"path", "T", "flops_per_n_loss_hv", "aten_ops_per_chunk", "host_syncs", "peak_transient_mb"}


@pytest.fixture(scope="module")
def rows():
    return counters.collect(tiny=True, only_t=[16, 64])


def _row(rows, what, path, rule, t):
    (r,) = [r for r in rows if (r["what"], r["path"], r["row_rule"], r["T"]) == (what, path, rule, t)]
    return r


def test_json_rows_have_the_keys(capsys):
    assert counters.main(["--tiny", "--json", "--no-step", "--T", "16"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert {(r["what"], r["path"], r["row_rule"]) for r in lines} >= {("op", "dpo", "cpu"), ("op", "metapo", "cuda")}
    for r in lines:
        assert KEYS <= set(r), KEYS - set(r)


def test_single_pass_dpo_is_8_nhv_on_cpu(rows):
    """T=16 (T_llama=256): one pair fits the budget; compacted rows: exactly the 8NHV floor."""
    for what in ("op", "step"):
        assert _row(rows, what, "dpo", "cpu", 16)["flops_per_n_loss_hv"] == pytest.approx(8.0, rel=0.02)


def test_no_host_sync_inside_the_op_or_the_ghost_pass(rows):
    for r in rows:
        if r["row_rule"] == "cuda":
            assert r["host_syncs"] == 0, (r["what"], r["path"], r["T"], r["sync_ops"])


def test_peak_transient_memory_is_bounded_by_the_budget(rows):
    """Temporaries stay within a small multiple of one chunk's logits (policy + reference)."""
    budget_mb = rows[0]["chunk_rows"] * rows[0]["V"] * 4 * 2 / 2**20
    for r in rows:
        if r["what"] == "op":
            assert r["peak_transient_mb"] <= 2.5 * budget_mb, r
