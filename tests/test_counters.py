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


@pytest.mark.parametrize("t", [16, 64])  # T_llama 256 (a pair fits a chunk) and 1024 (it does not: streamed)
@pytest.mark.parametrize("rule", ["cpu", "cuda"])
@pytest.mark.parametrize("path", ["dpo", "metapo"])
@pytest.mark.parametrize("what", ["op", "step"])
def test_lm_head_is_8_nhv(rows, what, path, rule, t):
    """The LM head's GEMMs cost the 8NHV floor in N_loss (labelled tokens): no recomputation (MetaPO
    in one pass, long pairs streamed), no prompt/padding rows (CUDA path with the host's labels)."""
    assert _row(rows, what, path, rule, t)["flops_per_n_loss_hv"] == pytest.approx(8.0, rel=0.02)


def test_host_built_tensors_count_as_copies_on_the_cuda_rule_only(rows):
    """On the CUDA row rules each host-built tensor the schedule moves to the device is one more op
    (a queued copy on a GPU, a no-op here); on the CPU rule nothing is copied."""
    for t in (16, 64):
        cuda, cpu = _row(rows, "op", "dpo", "cuda", t), _row(rows, "op", "dpo", "cpu", t)
        assert cuda["h2d_copies"] >= 2 and cpu["h2d_copies"] == 0, (cuda, cpu)
        assert _row(rows, "ghost", "ghost", "cuda", t)["h2d_copies"] >= 1


def test_bare_row_path_pays_for_unlabelled_rows(rows):
    """Without the host's labels the CUDA path multiplies every row: the counter sees it."""
    r = _row(rows, "op", "dpo", "bare", 64)
    assert r["flops_per_n_loss_hv"] == pytest.approx(8.0 * r["rows"] / r["n_loss"], rel=0.02)


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


def test_peak_transient_memory_does_not_grow_with_t(rows):
    """T=64 has 4.5x the labelled rows of T=16; the temporaries (one chunk) stay within 2x."""
    budget_mb = rows[0]["chunk_rows"] * rows[0]["V"] * 4 * 2 / 2**20
    for path in ("dpo", "metapo"):
        small, large = (_row(rows, "op", path, "cuda", t)["peak_transient_mb"] for t in (16, 64))
        assert large <= max(2 * small, budget_mb), (path, small, large)


@pytest.fixture(scope="module")
def long_rows():
    """The op alone at T_llama 4096 (19 chunks: the per-call overhead amortised as in training)."""
    ts, h, v, chunk_bytes, scale = counters.plan(True, True)
    out = {}
    for rule, compact in (("cpu", True), ("cuda", False)):
        for path in ("dpo", "metapo"):
            with counters.force_row_rule(compact):
                out[path, rule] = counters.op_row(path, 256, 2, h, v, chunk_bytes, "auto", host_labels=not compact)
    return out


@pytest.mark.parametrize("rule", ["cpu", "cuda"])
@pytest.mark.parametrize("path", ["dpo", "metapo"])
def test_at_most_20_aten_ops_per_chunk(long_rows, path, rule):
    """Issue #14: <= 20 aten ops per logits chunk, every overhead of the call included (the
    per-chunk loss gradient is a closed form, the chunk schedule is built once)."""
    r = long_rows[path, rule]
    assert r["chunks"] >= 16, r
    assert r["aten_ops_per_chunk"] <= 20, r


@pytest.mark.parametrize("path,rule", [("dpo", "cpu"), ("dpo", "cuda"), ("dpo", "bare"), ("metapo", "cpu"), ("metapo", "cuda")])
def test_at_most_20_aten_ops_per_chunk_at_t_llama_1k(rows, path, rule):
    """Issue #14 at T_llama 1k, where a pair no longer fits a chunk and is streamed in a few blocks,
    so the call's fixed cost weighs most: the schedule's host data in one copy, the statistics
    written by the epilogue into one row buffer, the streamed blocks' forward and backward in one
    epilogue call, one GEMM per pair for its logits and one for its coefficients."""
    r = _row(rows, "op", path, rule, 64)
    assert r["chunks"] >= 6, r
    assert r["aten_ops_per_chunk"] <= 20, r


@pytest.mark.parametrize("rule", ["cpu", "cuda"])
@pytest.mark.parametrize("path", ["dpo", "metapo"])
def test_marginal_ops_per_chunk(rows, long_rows, path, rule):
    """What one more chunk costs (two T, fixed overhead cancelled): the loop body alone, <= 16 ops."""
    short, long = _row(rows, "op", path, rule, 64), long_rows[path, rule]
    marginal = (long["aten_ops"] - short["aten_ops"]) / (long["chunks"] - short["chunks"])
    assert marginal <= 16, (marginal, short, long)


def test_ghost_pass_on_the_cuda_rule_costs_4_nhv_with_the_host_labels(rows):
    """The meta-update's LM-head ghost pass: two GEMMs over labelled rows only (4 N_loss H V) on the
    CUDA row rule when given the host's labels; without them every row is multiplied."""
    for t in (16, 64):
        assert _row(rows, "ghost", "ghost", "cuda", t)["flops_per_n_loss_hv"] == pytest.approx(4.0, rel=0.02)
    bare = _row(rows, "ghost", "ghost", "bare", 16)
    assert bare["flops_per_n_loss_hv"] == pytest.approx(4.0 * bare["rows"] / bare["n_loss"], rel=0.02)
    assert bare["flops_per_n_loss_hv"] > 5.0


def test_ghost_pass_at_most_20_aten_ops_per_chunk(rows):
    """Issue #14: the meta-update's LM-head ghost pass, every overhead of the call included: its rows,
    targets, coefficients and pairs gathered once, then six ops per chunk (two GEMMs, the epilogue's
    forward and backward, a product, a row sum) and one index_add at the end (25-30 before; ~40
    fixed ops per call)."""
    ghost = {(r["row_rule"], r["T"]): r for r in rows if r["what"] == "ghost"}
    for rule in {k[0] for k in ghost}:
        short, long = ghost[rule, 16], ghost[rule, 64]  # 1-2 chunks at T_llama 256, 5-8 at 1k
        assert long["chunks"] >= 4 and long["aten_ops_per_chunk"] <= 20, long
        marginal = (long["aten_ops"] - short["aten_ops"]) / (long["chunks"] - short["chunks"])
        assert marginal <= 8, (marginal, short, long)
        assert short["host_syncs"] == long["host_syncs"] == 0, (short, long)


@pytest.mark.parametrize("rule", ["cpu", "cuda"])
@pytest.mark.parametrize("path", ["dpo", "metapo"])
def test_trainer_step_ops_by_origin(rows, path, rule):
    """A trainer-step row counts the decoder's forward and backward too; by origin, the LM head's own
    ops per chunk are the op's (<= 20 at T_llama 1k), and the origins add up to every op."""
    step, op = _row(rows, "step", path, rule, 64), _row(rows, "op", path, rule, 64)
    by = step["aten_ops_by_origin"]
    assert sum(by.values()) + step["h2d_copies"] == step["aten_ops"]
    assert by["decoder"] > 0 and by["autograd"] > 0 and op["aten_ops_by_origin"]["decoder"] == 0
    assert by["head"] == op["aten_ops_by_origin"]["head"]
    assert step["aten_ops_per_chunk_head"] <= 20 < step["aten_ops_per_chunk"]
