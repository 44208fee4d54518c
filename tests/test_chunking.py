"""The one chunk schedule (metapo_fast/ops/chunking.py) and the LM-head ghost pass that uses it."""
import pytest
import torch

from metapo_fast.metapo.ghost import head_ghost_dots
from metapo_fast.ops.chunking import ChunkSchedule


def _mask(b2, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b2, t, generator=g) > 0.4
    m[1] = False  # a sequence with no labelled row
    return m.reshape(-1)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("rows_per_chunk", [1, 5, 14, 1000])
def test_every_row_once_within_budget(compact, rows_per_chunk):
    b2, t = 6, 7
    mask = _mask(b2, t)
    s = ChunkSchedule(mask, b2, t, rows_per_chunk, compact=compact)
    want = mask.nonzero().squeeze(1) if compact else torch.arange(b2 * t)
    rows, seq = s.token_rows()  # the ghost pass's rows (in blocks of rows_per_chunk)
    assert torch.equal(rows.sort().values, want) and torch.equal(rows, rows.sort().values)
    assert torch.equal(seq, rows // t)
    if not s.pairs_fit:
        assert rows_per_chunk < 2 * t
        return
    rows, pairs = [], []
    for c in s.pair_chunks():
        assert len(c.rows) <= max(rows_per_chunk, 2 * t)
        assert torch.equal(c.seqs, torch.cat([c.pairs, c.pairs + b2 // 2]))
        assert torch.equal(c.seqs[c.seq_local], c.rows // t)  # seq_local indexes the chunk's sequences
        rows.append(c.rows)
        pairs.append(c.pairs)
    assert torch.equal(torch.cat(rows).sort().values, want)
    assert torch.equal(torch.cat(pairs), torch.arange(b2 // 2))


def test_rows_for_the_memory_rule():
    assert ChunkSchedule.rows_for(256 * 2 ** 20, 32000, 4, True) == 256 * 2 ** 20 // (32000 * 4 * 2)
    assert ChunkSchedule.rows_for(256 * 2 ** 20, 128256, 2, False) == 256 * 2 ** 20 // (128256 * 2)
    assert ChunkSchedule.rows_for(1, 128256, 2, True) == 1  # at least one row


@pytest.mark.parametrize("rows_per_chunk", [3, 100])
def test_head_ghost_dots_both_row_rules_equal_the_definition(rows_per_chunk):
    """Dropping unlabelled rows (CPU) and keeping them with a zero coefficient (CUDA: no host sync)
    give the same c_i, equal to the definition sum_t <coef_s (onehot - softmax), G_W h + G_b>."""
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 7, 5, 11
    d = torch.float64
    hidden = torch.randn(2 * b, t, h, dtype=d, generator=g)
    weight, bias = torch.randn(v, h, dtype=d, generator=g), torch.randn(v, dtype=d, generator=g)
    gw, gb = torch.randn(v, h, dtype=d, generator=g), torch.randn(v, dtype=d, generator=g)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :2] = -100
    labels[4] = -100
    coef = torch.randn(2 * b, dtype=d, generator=g)
    got = [head_ghost_dots(hidden, weight, bias, labels, coef, gw, gb, b, rows_per_chunk=rows_per_chunk, backend="torch",
                           compact=c) for c in (True, False)]
    logits = hidden @ weight.t() + bias
    m = labels != -100
    onehot = torch.nn.functional.one_hot(torch.where(m, labels, 0), v).to(d)
    grad = coef[:, None, None] * (onehot - logits.softmax(-1)) * m[..., None]
    per_seq = (grad * (hidden @ gw.t() + gb)).sum((1, 2))
    want = per_seq[:b] + per_seq[b:]
    for x in got:
        torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
    assert want.abs().min() > 1e-3  # non-trivial values


def test_a_schedule_without_a_device_mask_needs_the_host_mask_and_the_device():
    with pytest.raises(ValueError, match="host_mask and device"):
        ChunkSchedule(None, 4, 3, 8, compact=True)
    with pytest.raises(ValueError, match="host_mask and device"):
        ChunkSchedule(None, 4, 3, 8, compact=True, host_mask=torch.ones(12, dtype=torch.bool))
    s = ChunkSchedule(None, 4, 3, 8, compact=False, host_mask=_mask(4, 3), device=torch.device("cpu"))
    rows, _ = s.token_rows()
    assert torch.equal(rows, _mask(4, 3).nonzero().squeeze(1))  # the host's rule: labelled rows only
