"""pytest-benchmark cases: `pytest benchmarks/test_bench_fused_loss.py --benchmark-columns=median,iqr`.

Small CPU shapes (B=4 pairs, T=128, H=256, V=8192, fp32) so they run in seconds; the large
side-by-side comparison with peak memory is `python -m benchmarks.fused_loss`.
"""
import pytest
import torch

from metapo_fast import fused_linear_preference_loss
from metapo_fast.losses import PairBatch, pair_loss
from tests.naive import sequence_logps

B, T, H, V = 4, 128, 256, 8192


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * H ** -0.5
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, : T // 4] = -100
    return hidden, w, labels, torch.randn(2 * B, T, H, generator=g), torch.randn(V, H, generator=g) * H ** -0.5


def _ours(hidden, w, labels, rh, rw, backend):
    h, wt = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    fused_linear_preference_loss(h, wt, labels, ref_hidden=rh, ref_weight=rw, backend=backend).loss.backward()


def _naive(hidden, w, labels, rh, rw):
    h, wt = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    s = sequence_logps(h, wt, labels, ref_hidden=rh, ref_weight=rw)
    pair_loss(PairBatch(s.logps[:B], s.logps[B:], s.counts[:B], s.counts[B:], s.ref_logps[:B], s.ref_logps[B:]))[0].backward()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_fused_fwd_bwd(benchmark, inputs, backend):
    benchmark.group = "fused loss fwd+bwd (CPU, fp32)"
    benchmark(_ours, *inputs, backend)


def test_naive_fwd_bwd(benchmark, inputs):
    benchmark.group = "fused loss fwd+bwd (CPU, fp32)"
    benchmark(_naive, *inputs)
