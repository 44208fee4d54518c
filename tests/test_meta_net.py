"""MetaWeightNet (docs/math.md section 4, paper Sec. 3.3)."""
import math

import pytest
import torch

from metapo_fast.metapo.weight_net import SOFTPLUS_INV_ONE, MetaWeightNet, feature_subset


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_all_ones_at_init(arch):
    torch.manual_seed(0)
    net = MetaWeightNet(arch=arch)
    s = torch.randn(9, 6) * 5
    w = net(s, update_stats=True)
    torch.testing.assert_close(w, torch.ones(9), rtol=0, atol=1e-6)
    assert math.log1p(math.exp(SOFTPLUS_INV_ONE)) == pytest.approx(1.0, abs=1e-15)


def test_linear_has_seven_parameters_and_formula():
    net = MetaWeightNet()
    assert sum(p.numel() for p in net.parameters()) == 7
    with torch.no_grad():
        net.v.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0, 0.0, 0.25]))
        net.b.fill_(0.1)
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # no statistics yet: scale 1, so w = softplus(0.5 - 2 + 8 + 1.5 + 0.1) = softplus(8.1)
    assert net(s).item() == pytest.approx(math.log1p(math.exp(8.1)), rel=1e-6)


def test_feature_normalisation_is_rms_and_saved():
    """Two batches with momentum 0.5: EMA = 0.5*(0.5*m1) + 0.5*m2, bias correction 1 - 0.25 = 0.75."""
    net = MetaWeightNet(stats_momentum=0.5)
    s1 = torch.full((4, 6), 2.0)   # mean square 4
    s2 = torch.full((4, 6), 4.0)   # mean square 16
    net.update_stats(s1)
    net.update_stats(s2)
    expected = math.sqrt((0.25 * 4 + 0.5 * 16) / 0.75)
    torch.testing.assert_close(net.scale(), torch.full((6,), expected, dtype=torch.float64))
    other = MetaWeightNet(stats_momentum=0.5)
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other.scale(), net.scale())


def test_standardize_centres_and_scales_with_the_running_moments():
    """momentum 0.5, batches with means 1 and 3 and variances 1 and 4 (per feature): bias-corrected
    EMAs mean = (0.25*1 + 0.5*3)/0.75, E[s^2] = (0.25*2 + 0.5*13)/0.75; sd = sqrt(E[s^2] - mean^2)."""
    net = MetaWeightNet(stats_momentum=0.5, feature_norm="standardize")
    s1 = torch.tensor([[0.0] * 6, [2.0] * 6])          # mean 1, mean square 2
    s2 = torch.tensor([[1.0] * 6, [5.0] * 6])          # mean 3, mean square 13
    net.update_stats(s1)
    net.update_stats(s2)
    mean = (0.25 * 1 + 0.5 * 3) / 0.75
    sd = math.sqrt((0.25 * 2 + 0.5 * 13) / 0.75 - mean ** 2)
    torch.testing.assert_close(net.center(), torch.full((6,), mean, dtype=torch.float64))
    torch.testing.assert_close(net.scale(), torch.full((6,), sd, dtype=torch.float64))
    x = torch.tensor([[4.0, 0.0, 1.0, 2.0, 3.0, 5.0]])
    torch.testing.assert_close(net.normalize_features(x), (x - mean) / (sd + 1e-8))
    rms = MetaWeightNet(stats_momentum=0.5)
    rms.update_stats(s1), rms.update_stats(s2)
    torch.testing.assert_close(rms.normalize_features(x), x / (math.sqrt((0.25 * 2 + 0.5 * 13) / 0.75) + 1e-8))
    other = MetaWeightNet(stats_momentum=0.5, feature_norm="standardize")
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other.normalize_features(x), net.normalize_features(x))
    with pytest.raises(ValueError, match="feature_norm"):
        MetaWeightNet(feature_norm="whiten")


def test_batch_mean_normalisation_and_gradient():
    torch.manual_seed(0)
    net = MetaWeightNet(normalize="batch_mean")
    with torch.no_grad():
        net.v.normal_()
    s = torch.randn(8, 6)
    w = net(s)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    (w * torch.arange(8.0)).sum().backward()
    assert net.v.grad.abs().sum() > 0


def test_feature_subsets_zero_features():
    net = MetaWeightNet(features="no_volatility")
    assert net.feature_names == ("margin", "ema_margin", "kl", "ema_kl")
    with torch.no_grad():
        net.v.fill_(1.0)
    s = torch.zeros(1, 6)
    s[0, 2] = s[0, 3] = 100.0   # only volatility features set: they are ignored
    assert net(s).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown feature subset"):
        feature_subset("no_everything")
    with pytest.raises(ValueError, match="subset of"):
        feature_subset(["margin", "vibes"])


def test_shapley_sums_to_centred_preactivation():
    torch.manual_seed(0)
    net = MetaWeightNet()
    with torch.no_grad():
        net.v.normal_()
    s = torch.randn(10, 6)
    net.update_stats(s)
    phi = net.shapley(s)
    pre = net.preactivation(net.normalize_features(s)).detach()
    torch.testing.assert_close(phi.sum(1), pre - pre.mean(), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        MetaWeightNet(arch="transformer")
    with pytest.raises(ValueError, match="normalize"):
        MetaWeightNet(normalize="softmax")
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        MetaWeightNet()(torch.zeros(3, 5))


def test_margin_baseline_is_sigmoid_of_the_normalised_ema_margin():
    """meta.weighting=ema_margin: w = sigmoid(kappa * ema_margin / rms), mean 1, nothing to learn."""
    from metapo_fast.metapo.weight_net import MarginWeights

    net = MarginWeights(kappa=2.0)
    s = torch.zeros(4, 6)
    s[:, 1] = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    s[:, 0] = torch.tensor([9.0, -9.0, 9.0, -9.0])  # the current margin does not matter
    net.update_stats(s)
    rms = float(s[:, 1].pow(2).mean().sqrt())
    raw = torch.sigmoid(2.0 * s[:, 1] / (rms + 1e-8))
    torch.testing.assert_close(net(s), raw / raw.mean())
    torch.testing.assert_close(net(s, normalize=False), raw)
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="kappa"):
        MarginWeights(kappa=0.0)


def test_prompt_centred_margins_against_a_loop():
    """meta.filter_by=prompt_margin ranks z_i minus the mean margin of its prompt's pairs."""
    import numpy as np

    from metapo_fast.metapo.weight_net import prompt_centred

    rng = np.random.default_rng(0)
    z, g = rng.normal(size=37), rng.integers(0, 6, size=37)
    want = [z[i] - z[g == g[i]].mean() for i in range(37)]
    np.testing.assert_allclose(prompt_centred(z, g), want, rtol=0, atol=1e-12)
    # a hard prompt (all margins low) keeps its pairs: only the pair below its own prompt's others is lowest
    got = prompt_centred([-3.0, -3.2, -2.8, 2.0, 2.1, -1.0], [0, 0, 0, 1, 1, 1])
    assert int(np.argmin(got)) == 5
    with pytest.raises(ValueError, match="two"):
        prompt_centred(np.zeros(3), np.zeros(4, int))


def test_static_filter_drops_exactly_the_lowest_margins():
    """PairFilter (meta.weighting=static_filter, paper App. A.8): weight 1 until fitted, then the
    round(fraction * n) lowest-margin pairs weigh 0 (ties: lower pair id dropped first), the rest
    normalised to batch mean 1; the kept set is state (resumes)."""
    from metapo_fast.metapo.weight_net import PairFilter

    f = PairFilter(10, after_steps=3, fraction=0.3)
    ids = torch.tensor([0, 3, 7, 9])
    torch.testing.assert_close(f.pair_weights(ids), torch.ones(4), rtol=0, atol=0)
    z = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.1, 3.0, -2.0, 0.1, 1.0, 0.0])
    assert f.fit(z) == 3
    dropped = set(torch.nonzero(f.keep == 0).flatten().tolist())
    assert dropped == {6, 1, 9}
    # batch 0, 3, 7, 9: pair 9 dropped -> weights 0 and 4/3 for the three kept
    torch.testing.assert_close(f.pair_weights(ids), torch.tensor([4 / 3, 4 / 3, 4 / 3, 0.0]))
    torch.testing.assert_close(f.pair_weights(ids, normalize=False), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    g = PairFilter(10, after_steps=3, fraction=0.4, normalize="none")
    g.fit(z)  # 4 dropped: -2, -1, 0.0 and the first of the three tied 0.1 (pair 3)
    assert set(torch.nonzero(g.keep == 0).flatten().tolist()) == {6, 1, 9, 3}
    torch.testing.assert_close(g.pair_weights(ids), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    h = PairFilter(10, after_steps=3, fraction=0.4)
    h.load_state_dict(g.state_dict())
    assert torch.equal(h.keep, g.keep)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        f.fit(torch.zeros(9))
    with pytest.raises(ValueError, match="fraction"):
        PairFilter(10, 3, 1.0)
    # down-weighting instead of dropping: the 3 filtered pairs keep 0.25 before normalisation
    s = PairFilter(10, after_steps=3, fraction=0.3, filtered_weight=0.25)
    s.fit(z)
    torch.testing.assert_close(s.pair_weights(ids, normalize=False), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(s.pair_weights(ids), torch.tensor([1.0, 1.0, 1.0, 0.25]) / 0.8125)
    with pytest.raises(ValueError, match="filtered_weight"):
        PairFilter(10, 3, 0.3, filtered_weight=1.0)
