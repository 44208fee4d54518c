"""Hand-worked values for every registered loss (docs/math.md section 2).

One pair throughout (float64):
    chosen sum logp = -2.0 over 2 tokens   (avg -1.0)
    rejected sum logp = -3.0 over 4 tokens (avg -0.75)
    reference sums: chosen -2.5, rejected -2.5
    lr_w = -2.0 - (-2.5) = 0.5,  lr_l = -3.0 - (-2.5) = -0.5
    beta = 0.5  ->  z = beta (lr_w - lr_l) = 0.5 * 1.0 = 0.5
"""
import math

import pytest
import torch

from metapo_fast.losses import LOSSES, LossParams, PairBatch, get_loss, pair_loss, register_loss, sequence_coefficients


def _batch(requires_grad=False):
    lp = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=requires_grad)
    return lp, PairBatch(
        chosen_logps=lp[:1], rejected_logps=lp[1:],
        chosen_counts=torch.tensor([2.0], dtype=torch.float64), rejected_counts=torch.tensor([4.0], dtype=torch.float64),
        ref_chosen_logps=torch.tensor([-2.5], dtype=torch.float64), ref_rejected_logps=torch.tensor([-2.5], dtype=torch.float64),
    )


def _loss(name, **params):
    _, b = _batch()
    loss, z = get_loss(name).fn(b, LossParams(**params))
    return float(loss[0]), float(z[0])


def test_sigmoid_dpo():
    """-log sigma(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770."""
    loss, z = _loss("sigmoid", beta=0.5)
    assert z == pytest.approx(0.5, abs=1e-12)
    assert loss == pytest.approx(0.47407698418010663, abs=1e-12)


def test_sigmoid_label_smoothing():
    """eps = 0.1: 0.9 * 0.4740770 + 0.1 * (-log sigma(-0.5)); -log sigma(-z) = z - log sigma(z) = 0.9740770,
    so 0.4266693 + 0.0974077 = 0.5240770."""
    loss, _ = _loss("sigmoid", beta=0.5, label_smoothing=0.1)
    assert loss == pytest.approx(0.5240769841801066, abs=1e-12)


def test_robust_rdpo_is_unbiased_for_a_known_flip_rate():
    """eps = 0.2: (0.8 * 0.4740770 - 0.2 * 0.9740770) / 0.6 = (0.3792616 - 0.1948154) / 0.6 = 0.3074103.
    Unbiased: its expectation over a label flipped with probability eps is the clean DPO loss."""
    loss, z = _loss("robust", beta=0.5, label_smoothing=0.2)
    assert z == pytest.approx(0.5, abs=1e-12)
    assert loss == pytest.approx((0.8 * 0.47407698418010663 - 0.2 * 0.9740769841801066) / 0.6, abs=1e-12)
    assert loss == pytest.approx(0.3074103, abs=1e-7)
    # E over the flip: 0.8 * L(z) + 0.2 * L(-z) == -log sigma(z)
    lp, b = _batch()
    swapped = PairBatch(b.rejected_logps, b.chosen_logps, b.rejected_counts, b.chosen_counts, b.ref_rejected_logps,
                        b.ref_chosen_logps)
    p = LossParams(beta=0.5, label_smoothing=0.2)
    expect = 0.8 * get_loss("robust").fn(b, p)[0] + 0.2 * get_loss("robust").fn(swapped, p)[0]
    assert float(expect[0]) == pytest.approx(0.47407698418010663, abs=1e-12)
    assert _loss("robust", beta=0.5)[0] == pytest.approx(_loss("sigmoid", beta=0.5)[0], abs=1e-15)  # eps = 0: DPO


def test_ipo_uses_average_logratios_and_its_target():
    """avg lr_w = -2/2 - (-2.5/2) = 0.25; avg lr_l = -3/4 - (-2.5/4) = -0.125; difference 0.375;
    target 1/(2 beta) = 1; (0.375 - 1)^2 = 0.390625. (Sums would give (1 - 1)^2 = 0.)"""
    loss, z = _loss("ipo", beta=0.5)
    assert loss == pytest.approx(0.390625, abs=1e-12)
    assert z == pytest.approx(0.5, abs=1e-12)  # logit is the standard DPO margin


def test_focal_value_and_gradient_through_both_factors():
    """gamma = 2, p = sigma(0.5) = 0.6224593: loss = -p^2 log p = 0.3874556 * 0.4740770 = 0.1836838.
    dl/dz = -p^g (1-p) (g log p + 1) = -0.3874556 * 0.3775407 * 0.0518460 = -0.0075841
    (a detached factor p^g would give -p^g (1-p) = -0.1462803). dz/dlogp_w = beta = 0.5."""
    lp, b = _batch(requires_grad=True)
    loss, _ = get_loss("focal").fn(b, LossParams(beta=0.5, focal_gamma=2.0))
    assert float(loss[0]) == pytest.approx(0.18368379135927973, abs=1e-12)
    (g,) = torch.autograd.grad(loss.sum(), lp)
    assert float(g[0]) == pytest.approx(0.5 * -0.00758405065263467, abs=1e-12)
    assert float(g[1]) == pytest.approx(-0.5 * -0.00758405065263467, abs=1e-12)


def test_focal_gamma_zero_is_dpo():
    assert _loss("focal", beta=0.5, focal_gamma=0.0)[0] == pytest.approx(_loss("sigmoid", beta=0.5)[0], abs=1e-12)


def test_simpo_length_normalisation():
    """beta = 2, gamma = 0.5: z = 2 (avg -1.0 - avg -0.75) - 0.5 = -1.0; -log sigma(-1) = log(1 + e) = 1.3132617.
    With sums instead of averages z would be 2 * 1 - 0.5 = 1.5 (loss 0.2014)."""
    loss, z = _loss("simpo", beta=2.0, simpo_gamma=0.5)
    assert z == pytest.approx(-1.0, abs=1e-12)
    assert loss == pytest.approx(1.3132616875182228, abs=1e-12)


def test_orpo():
    """log odds(a) = a - log(1 - e^a): a_w = -1 -> -1 + 0.4586751 = -0.5413249;
    a_l = -0.75 -> -0.75 + 0.6393535 = -0.1106465; z = -0.4306783;
    loss = NLL_avg(y_w) - 0.1 log sigma(z) = 1.0 + 0.1 * 0.9314948 = 1.0931495."""
    loss, z = _loss("orpo", orpo_lambda=0.1)
    assert z == pytest.approx(-0.4306783196532721, abs=1e-12)
    assert loss == pytest.approx(1.093149481352965, abs=1e-12)


def test_weighted_batch_loss_and_detached_weights():
    """L = (1/B) sum w_i l_i with B = 2: weights (2, 0) give (2 * l_0 + 0) / 2 = l_0; no grad into w."""
    lp = torch.tensor([-1.0, -2.0, -3.0, -1.5], dtype=torch.float64, requires_grad=True)
    ones = torch.ones(2, dtype=torch.float64)
    b = PairBatch(lp[:2], lp[2:], ones, ones, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    w = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss, per_pair, _ = pair_loss(b, "sigmoid", LossParams(beta=1.0), sample_weights=w)
    assert float(loss) == pytest.approx(float(per_pair[0]), abs=1e-12)
    loss.backward()
    assert w.grad is None
    assert float(lp.grad[1]) == 0.0 and float(lp.grad[0]) != 0.0


def test_fully_masked_response_is_finite():
    """A response with no tokens: sum 0, count 0 -> average 0; every loss stays finite."""
    zero = torch.zeros(1, dtype=torch.float64)
    b = PairBatch(zero, torch.tensor([-3.0], dtype=torch.float64), zero, torch.tensor([4.0], dtype=torch.float64), zero, zero)
    for name in LOSSES:
        loss, z = get_loss(name).fn(b, LossParams())
        assert torch.isfinite(loss).all() and torch.isfinite(z).all(), name


def test_registry_rejects_unknown_and_duplicates_and_missing_reference():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        get_loss("kto")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("sigmoid", needs_reference=True)(lambda b, p: None)
    _, b = _batch()
    b.ref_chosen_logps = None
    with pytest.raises(ValueError, match="needs reference"):
        get_loss("sigmoid").fn(b, LossParams())


@pytest.mark.parametrize("kwargs,match", [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                                          ({"focal_gamma": -1.0}, "focal_gamma"), ({"beta": math.nan}, "beta")])
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossParams(**kwargs)


# ---------------------------------------------------------------------------------------------
# Closed-form derivatives (used by the fused op per chunk) against autograd, float64.
# ---------------------------------------------------------------------------------------------
BUILTIN = ["sigmoid", "robust", "ipo", "focal", "simpo", "orpo"]
PARAMS = [LossParams(), LossParams(beta=0.5, label_smoothing=0.2, focal_gamma=2.5, simpo_gamma=1.0, orpo_lambda=0.7),
          LossParams(beta=3.0, label_smoothing=0.45, focal_gamma=0.0, simpo_gamma=0.0, orpo_lambda=0.0)]


def _random_sums(n, seed, scale):
    """2n sequences: sums of log-probs over 0..40 tokens (some empty), reference sums; ``scale``
    stretches the log-ratios so margins reach |z| ~ 1e3 (saturated sigmoids)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (2 * n,), generator=g).double()
    counts[0] = 0  # an empty chosen response
    logps = -torch.rand(2 * n, generator=g, dtype=torch.float64) * 3 * counts.clamp(min=1)
    logps[1] = -1e-9  # an average above ORPO's clamp (gradient 0 through it)
    logps[n] = -2.5e-7  # near it
    ref = logps + scale * torch.randn(2 * n, generator=g, dtype=torch.float64)
    return logps, counts, ref


def _autograd_coef(spec, params, logps, counts, ref, weights):
    return sequence_coefficients(spec, params, logps, counts, ref, weights, denom=7.0, closed_form=False)[3]


@pytest.mark.parametrize("scale", [0.1, 10.0, 1e3, 1e5])
@pytest.mark.parametrize("pi", range(len(PARAMS)))
@pytest.mark.parametrize("name", BUILTIN)
def test_closed_form_equals_autograd(name, pi, scale):
    spec, params = get_loss(name), PARAMS[pi]
    assert spec.has_closed_form, name
    n = 64
    logps, counts, ref = _random_sums(n, seed=pi * 10 + int(math.log10(scale) + 2), scale=scale)
    if not spec.needs_reference:
        logps = logps + scale * torch.randn(2 * n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).clamp(max=0)
        logps = logps.clamp(max=0)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(pi), dtype=torch.float64) * 3
    weights[:3] = 0.0
    for w in (None, weights):
        want = _autograd_coef(spec, params, logps, counts, ref if spec.needs_reference else None, w)
        loss, per_pair, logit, got = sequence_coefficients(spec, params, logps, counts, ref if spec.needs_reference else None,
                                                           w, denom=7.0)
        assert torch.isfinite(want).all(), (name, want)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13 * max(1.0, float(want.abs().max())))
        # the loss values do not depend on which derivative is used
        want_loss = sequence_coefficients(spec, params, logps, counts, ref if spec.needs_reference else None, w,
                                          denom=7.0, closed_form=False)[0]
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "focal"])
def test_logit_grad_equals_autograd_over_extreme_margins(name):
    """dl/dz over z from -1e4 to 1e4 (saturated both ways) and around 0, several params."""
    spec = get_loss(name)
    z = torch.cat([torch.linspace(-1e4, 1e4, 101, dtype=torch.float64), torch.linspace(-40, 40, 401, dtype=torch.float64),
                   torch.tensor([0.0, 1e-12, -1e-12, 745.0, -745.0], dtype=torch.float64)])
    zero = torch.zeros_like(z)
    for params in PARAMS:
        zz = (z / params.beta).requires_grad_()  # lr_w = z / beta, so the margin is z
        b = PairBatch(zz, zero, zero + 1, zero + 1, zero, zero)
        per_pair, logit = spec.fn(b, params)
        (want,) = torch.autograd.grad(per_pair.sum(), zz)
        got = spec.logit_grad(logit.detach(), params)
        torch.testing.assert_close(got * params.beta, want, rtol=1e-10, atol=1e-300)


def test_a_loss_without_closed_form_falls_back_to_autograd():
    """A loss registered with no derivative: sequence_coefficients differentiates it by autograd,
    and a wrong closed form would be caught by the comparison above (this one is checked by hand)."""
    name = "_test_cubic_margin"
    if name not in LOSSES:
        register_loss(name, needs_reference=True)(lambda b, p: ((b.chosen_logps - b.rejected_logps) ** 3, b.chosen_logps))
    spec = get_loss(name)
    assert not spec.has_closed_form
    lp = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    coef = sequence_coefficients(spec, LossParams(), lp, torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))[3]
    assert coef.tolist() == pytest.approx([3 * 2.0 ** 2, -3 * 2.0 ** 2])
