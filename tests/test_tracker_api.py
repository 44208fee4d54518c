"""TemporalTracker's vectorised PyTorch path and API against the reference (math.md section 3)."""
import pytest
import torch

from metapo_fast.ops.dispatch import cpp_compiler_present
from metapo_fast.ops.tracker_update import tracker_update_ref
from metapo_fast.metapo.tracker import TemporalTracker

BACKENDS = ["torch", "triton", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_compiler_present(), reason="no C++ compiler on PATH"))]


def _visits(seed, n, steps, b, dup=False):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randperm(n, generator=g)[:b]
        if dup:
            ids[1] = ids[0]
            ids[3] = ids[0]
        yield ids, torch.randn(b, generator=g) * 3, torch.rand(b, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dup", [False, True])
def test_backend_matches_reference_over_epochs(dup, backend):
    """fp32 state vs the float64 reference over 30 batches (~9 visits per pair): rel err <= 1e-6
    (plus 1e-6 absolute for values near 0, e.g. a std after two nearly equal margins)."""
    tr = TemporalTracker(20, alpha=0.8, backend=backend)
    ref = torch.zeros(20, 6, dtype=torch.float64)
    for ids, m, k in _visits(0, 20, 30, 6, dup):
        got = tr.update(ids, m, k)
        want = tracker_update_ref(ref, ids, m.double(), k.double(), 0.8)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tr.state.double(), ref, rtol=1e-6, atol=1e-6)
    assert tr.visits(torch.arange(20)).sum().item() == 30 * 6


def test_state_dict_round_trip_and_mismatch():
    a = TemporalTracker(10, backend="torch")
    for ids, m, k in _visits(1, 10, 5, 4):
        a.update(ids, m, k)
    b = TemporalTracker(10, backend="torch")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.state, b.state) and a.bytes_per_pair == 24 and a.nbytes == 240
    with pytest.raises(ValueError, match="num_pairs"):
        TemporalTracker(11).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="alpha"):
        TemporalTracker(10, alpha=0.5).load_state_dict(a.state_dict())


def test_bad_inputs():
    tr = TemporalTracker(5, backend="torch")
    with pytest.raises(ValueError, match=r"pair_ids\[1\] = 7 is outside \[0, 5\)"):
        tr.update(torch.tensor([0, 7]), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="margins must have shape"):
        tr.update(torch.tensor([0, 1]), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="alpha"):
        TemporalTracker(5, alpha=1.0)


def test_update_under_torch_compile():
    eager, comp = TemporalTracker(8, backend="torch"), TemporalTracker(8, backend="torch")
    f = torch.compile(lambda ids, m, k: comp.update(ids, m, k) * 1.0, fullgraph=True, backend="aot_eager")
    for ids, m, k in _visits(2, 8, 4, 3):
        torch.testing.assert_close(f(ids, m, k), eager.update(ids, m, k))
    assert torch.equal(eager.state, comp.state)
