"""The plain-PyTorch reference (docs/math.md sections 1 and 3) against hand-worked values and NumPy."""
import math

import numpy as np
import pytest
import torch

from metapo_fast.ops.lce_epilogue import lce_epilogue_backward_ref_, lce_epilogue_forward_ref
from metapo_fast.ops.tracker_update import tracker_update_ref
from tests import naive as R


def _hand_head():
    """H = 1, V = 2: hidden 1.0, weight [[0], [log 3]] -> logits [0, log 3] -> softmax [0.25, 0.75]."""
    return torch.ones(1, 1, 1, dtype=torch.float64), torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)


def test_token_logps_hand_worked():
    """log pi(1) = log 0.75 = -0.2876821; position masked with -100 contributes 0."""
    h, w = _hand_head()
    h2 = h.expand(1, 2, 1)
    lp, mask = R.token_logps(h2, w, torch.tensor([[1, -100]]))
    assert lp[0, 0].item() == pytest.approx(math.log(0.75), abs=1e-14)
    assert lp[0, 1].item() == 0.0 and mask.tolist() == [[True, False]]


def test_token_kl_hand_worked():
    """p = [0.25, 0.75], q = [0.5, 0.5]: KL = 0.25 log 0.5 + 0.75 log 1.5 = -0.1732868 + 0.3040988 = 0.1308120."""
    p = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    q = torch.zeros(1, 2, dtype=torch.float64)
    assert R.token_kl(p, q).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-14)
    assert R.token_kl(p, p).item() == pytest.approx(0.0, abs=1e-15)


def test_sequence_logps_sums_counts_kl_and_fully_masked_row():
    torch.manual_seed(0)
    b2, t, h, v = 4, 5, 3, 7
    hid = torch.randn(b2, t, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64)
    rh, rw = torch.randn(b2, t, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    labels = torch.randint(0, v, (b2, t))
    labels[:, :2] = -100          # prompt
    labels[3] = -100              # a fully masked response
    out = R.sequence_logps(hid, w, labels, ref_hidden=rh, ref_weight=rw)
    # explicit loops as the independent check
    for s in range(b2):
        lp = ref = kl = 0.0
        for k in range(t):
            if labels[s, k] == -100:
                continue
            x = torch.log_softmax(hid[s, k] @ w.T, -1)
            y = torch.log_softmax(rh[s, k] @ rw.T, -1)
            lp += float(x[labels[s, k]]); ref += float(y[labels[s, k]])
            kl += float((x.exp() * (x - y)).sum())
        assert out.logps[s].item() == pytest.approx(lp, abs=1e-12)
        assert out.ref_logps[s].item() == pytest.approx(ref, abs=1e-12)
        assert out.kl_sum[s].item() == pytest.approx(kl, abs=1e-12)
    assert out.counts.tolist() == [3.0, 3.0, 3.0, 0.0]
    assert out.logps[3].item() == 0.0 and torch.isfinite(out.logps).all()


def test_epilogue_reference_matches_definitions():
    torch.manual_seed(1)
    x = torch.randn(6, 11, dtype=torch.float64) * 4
    y = torch.randn(6, 11, dtype=torch.float64) * 4
    tgt = torch.randint(0, 11, (6,))
    lse, logp, ref_logp, kl = lce_epilogue_forward_ref(x, tgt, y)
    torch.testing.assert_close(logp, torch.log_softmax(x, -1)[torch.arange(6), tgt], rtol=0, atol=1e-13)
    torch.testing.assert_close(ref_logp, torch.log_softmax(y, -1)[torch.arange(6), tgt], rtol=0, atol=1e-13)
    torch.testing.assert_close(kl, R.token_kl(x, y), rtol=0, atol=1e-13)
    # backward epilogue == autograd of sum_r coef_r logp_r
    coef = torch.randn(6, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    (torch.log_softmax(xg, -1)[torch.arange(6), tgt] * coef).sum().backward()
    g = lce_epilogue_backward_ref_(x.clone(), lse, tgt, coef)
    torch.testing.assert_close(g, xg.grad, rtol=0, atol=1e-13)
    assert lce_epilogue_forward_ref(x, tgt)[2].numel() == 0


def _numpy_tracker(visits, n, alpha):
    """Float64 NumPy re-implementation of math.md section 3, one visit at a time."""
    st = np.zeros((n, 6))
    outs = []
    for ids, m, k in visits:
        out = np.zeros((len(ids), 6))
        for j, i in enumerate(ids):
            e1, e2, e3, mean, m2, c = st[i]
            if c == 0:
                c, mean, m2, f2, e1, e2, e3 = 1, m[j], 0.0, 0.0, m[j], 0.0, k[j]
            else:
                c += 1
                d = m[j] - mean
                mean += d / c
                m2 += d * (m[j] - mean)
                f2 = math.sqrt(m2 / c)
                e1 = alpha * e1 + (1 - alpha) * m[j]
                e2 = alpha * e2 + (1 - alpha) * f2
                e3 = alpha * e3 + (1 - alpha) * k[j]
            st[i] = [e1, e2, e3, mean, m2, c]
            out[j] = [m[j], e1, f2, e2, k[j], e3]
        outs.append(out)
    return st, outs


def test_tracker_reference_against_numpy_multi_epoch():
    rng = np.random.default_rng(0)
    n, alpha, visits = 13, 0.9, []
    for _epoch in range(4):
        perm = rng.permutation(n)
        for s in range(0, n, 4):
            ids = perm[s:s + 4]
            visits.append((ids, rng.normal(size=len(ids)) * 3, rng.gamma(1.0, size=len(ids))))
    visits.append((np.array([2, 2, 5]), np.array([1.0, -1.0, 0.5]), np.array([0.1, 0.2, 0.3])))  # repeated id
    st_np, outs_np = _numpy_tracker(visits, n, alpha)
    st = torch.zeros(n, 6, dtype=torch.float64)
    for (ids, m, k), o in zip(visits, outs_np):
        out = tracker_update_ref(st, torch.as_tensor(ids), torch.as_tensor(m), torch.as_tensor(k), alpha)
        np.testing.assert_allclose(out.numpy(), o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.numpy(), st_np, rtol=1e-12, atol=1e-12)
    # population std of all margins seen by pair 0 (the Welford definition, not an EMA mean)
    seen = np.concatenate([m[ids == 0] for ids, m, _ in visits if (ids == 0).any()])
    assert math.sqrt(st[0, 4].item() / st[0, 5].item()) == pytest.approx(seen.std(), rel=1e-12)


def test_tracker_first_visit_starts_emas_at_first_value():
    st = torch.zeros(3, 6, dtype=torch.float64)
    out = tracker_update_ref(st, torch.tensor([1]), torch.tensor([2.5], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64), 0.9)
    assert out[0].tolist() == [2.5, 2.5, 0.0, 0.0, 0.7, 0.7]
    assert st[1].tolist() == [2.5, 0.0, 0.7, 2.5, 0.0, 1.0] and st[0].abs().sum() == 0
