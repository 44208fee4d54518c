"""The LM-head epilogue (metapo_fast/ops/lce_epilogue.py) of every backend over vocabularies larger
than the Triton kernels' BLOCK_V (4096), so the online log-sum-exp must rescale across blocks: the
row maximum is put in the first, a middle and the last vocabulary block. Compared with the float64
reference, with flash-attention's rule: a backend's fp32 error is at most twice PyTorch's own fp32
error on the same input, plus 4 fp32 ulps of the largest value (PyTorch is sometimes exact to the
last bit by luck). Before blocked sums, the C++ lse drifted 2.8e-5 at V = 32003
against PyTorch's 1.2e-7."""
import os

import pytest
import torch

from metapo_fast.ops.dispatch import cpp_compiler_present
from metapo_fast.ops.lce_epilogue import lce_epilogue_backward_, lce_epilogue_backward_ref_, lce_epilogue_forward, lce_epilogue_forward_ref

BACKENDS = ["torch", "triton", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_compiler_present(), reason="no C++ compiler on PATH"))]


def _logits(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    y = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    for r, col in enumerate([0, v // 2, v - 1, 4100, 4095][:n]):  # the max in different blocks (block edges too)
        x[r, col] += 25.0
        y[r, (col + 7) % v] += 20.0
    tgt = torch.randint(0, v, (n,), generator=g)
    tgt[0] = 0
    tgt[2] = v - 1
    return x, y, tgt


def _ulps(x: torch.Tensor) -> float:
    return 4 * torch.finfo(torch.float32).eps * x.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [9000, 32003])
def test_forward_and_backward_across_vocabulary_blocks(backend, v):
    x64, y64, tgt = _logits(5, v, seed=v)
    want = lce_epilogue_forward_ref(x64, tgt, y64)
    pytorch = lce_epilogue_forward_ref(x64.float(), tgt, y64.float())  # PyTorch's own fp32 error is the yardstick
    got = lce_epilogue_forward(x64.float(), tgt, y64.float(), backend=backend)
    for name, a, p, b in zip(("lse", "logp", "ref_logp", "kl"), got, pytorch, want):
        err, base = (a.double() - b).abs().max().item(), (p.double() - b).abs().max().item()
        assert err <= 2 * base + _ulps(b), f"{backend} V={v} {name}: error {err:.2e}, PyTorch fp32 {base:.2e}"
    coef = torch.linspace(-1.5, 2.0, 5, dtype=torch.float64)
    g_want = lce_epilogue_backward_ref_(x64.clone(), want[0], tgt, coef)
    g_pt = lce_epilogue_backward_ref_(x64.float().clone(), want[0].float(), tgt, coef.float())
    g = lce_epilogue_backward_(x64.float().clone(), want[0].float(), tgt, coef.float(), backend=backend)
    err, base = (g.double() - g_want).abs().max().item(), (g_pt.double() - g_want).abs().max().item()
    assert err <= 2 * base + _ulps(g_want), f"{backend} V={v} backward: error {err:.2e}, PyTorch fp32 {base:.2e}"
    assert g_want.abs().max() > 0.5  # the target entries carry coef * (1 - p)


def test_cpp_build_name_is_keyed_by_sources_and_toolchain(tmp_path):
    """Two checkouts with the same sources share a build; a changed source gets its own (no
    rebuilding each other's extension in one cache directory)."""
    import shutil

    from metapo_fast.ops.dispatch import _sources, cpp_build_name

    srcs = _sources()
    a = [shutil.copy(s, tmp_path / os.path.basename(s)) for s in srcs]
    assert cpp_build_name(srcs, "c++") == cpp_build_name([str(p) for p in a], "c++")
    with open(a[0], "a") as f:
        f.write("\n// changed\n")
    assert cpp_build_name([str(p) for p in a], "c++") != cpp_build_name(srcs, "c++")
    assert cpp_build_name(srcs, "c++").startswith("metapo_fast_cpp_")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("v", [9000, 32003])
def test_forward_into_a_buffer_with_the_fused_backward(backend, with_ref, v):
    """``lce_epilogue_forward_into`` (the fused loss's call): the statistics land in columns 0-2 of
    a block of a wider row buffer (row stride 5) and nothing else of the buffer changes; with
    ``grad=True`` the logits then hold the backward for coefficient 1, across vocabulary blocks."""
    from metapo_fast.ops.lce_epilogue import lce_epilogue_forward_into

    x64, y64, tgt = _logits(5, v, seed=v + 1)
    want = lce_epilogue_forward_ref(x64, tgt, y64 if with_ref else None)
    pytorch = lce_epilogue_forward_ref(x64.float(), tgt, y64.float() if with_ref else None)
    g_want = lce_epilogue_backward_ref_(x64.clone(), want[0], tgt, torch.ones(5, dtype=torch.float64))
    g_pt = lce_epilogue_backward_ref_(x64.float().clone(), pytorch[0], tgt, torch.ones(5))
    for grad in (False, True):
        buf = torch.full((9, 5), 7.0)
        block = buf[2:7]
        x = x64.float().clone()
        lse = lce_epilogue_forward_into(x, tgt, y64.float() if with_ref else None, block, grad=grad, backend=backend)
        cols = [lse, block[:, 0]] + ([block[:, 1], block[:, 2]] if with_ref else [])
        for name, a, p, b in zip(("lse", "logp", "ref_logp", "kl"), cols, pytorch, want):
            err, base = (a.double() - b).abs().max().item(), (p.double() - b).abs().max().item()
            assert err <= 2 * base + _ulps(b), f"{backend} V={v} {name}: error {err:.2e}, PyTorch fp32 {base:.2e}"
        untouched = torch.ones_like(buf, dtype=torch.bool)
        untouched[2:7, : 3 if with_ref else 1] = False
        assert (buf[untouched] == 7.0).all()
        if grad:
            err, base = (x.double() - g_want).abs().max().item(), (g_pt.double() - g_want).abs().max().item()
            assert err <= 2 * base + _ulps(g_want), f"{backend} V={v} fused backward: error {err:.2e}, PyTorch {base:.2e}"
        else:
            assert torch.equal(x, x64.float())


def test_forward_into_refuses_a_buffer_it_cannot_write():
    from metapo_fast.ops.lce_epilogue import lce_epilogue_forward_into

    x, y, tgt = (a.float() if a.is_floating_point() else a for a in _logits(3, 50, seed=0))
    for bad in (torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 3).t(), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match="stats must be"):
            lce_epilogue_forward_into(x, tgt, y, bad, backend="torch")
    # one row: the column stride still matters (Triton writes the columns as contiguous)
    for bad in (torch.zeros(1, 6)[:, ::2],):
        with pytest.raises(ValueError, match="stats must be"):
            lce_epilogue_forward_into(x[:1], tgt[:1], y[:1], bad, backend="torch")
