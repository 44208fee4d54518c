"""Meta-update exactness (docs/math.md section 5): ghost dot products vs exact per-pair gradients,
and the phi gradient vs the double-backward one-step lookahead, on a tiny Llama."""
import copy

import pytest
import torch
from torch import nn

from metapo_fast.metapo.ghost import GhostCoverageError
from metapo_fast.losses import LossParams, PairBatch, get_loss
from metapo_fast.metapo.bilevel import MetaLearner, pair_gradient_dots
from metapo_fast.metapo.weight_net import SOFTPLUS_INV_ONE, MetaWeightNet
from tests.naive import sequence_logps

B, T, V = 3, 9, 37
PARAMS = LossParams(beta=0.5)


def tiny_llama(tied: bool, dtype=torch.float64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"  # double backward (the exact reference) needs it
    m = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norm weights and head
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m


def policy_and_reference(tied: bool, attn: str = "eager"):
    """A tiny Llama reference and a policy moved away from it (so margins and KL are non-zero)."""
    ref = tiny_llama(tied)
    ref.config._attn_implementation = attn
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ref


def make_batch(seed, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * b, t), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    for r in range(2 * b):
        p = 2 + r % 3
        end = t - (r % 2)  # some right padding
        mask[r, end:] = 0
        labels[r, p - 1:end - 1] = ids[r, p:end]
    labels[1] = -100  # a chosen response with no tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def naive_pair_losses(model, ref, batch, loss_type="sigmoid", params=PARAMS):
    """Per-pair losses l_i from full logits (differentiable in every parameter)."""
    h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    s = sequence_logps(h, model.lm_head.weight, batch["labels"])
    with torch.no_grad():
        rh = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        r = sequence_logps(rh, ref.lm_head.weight, batch["labels"]).logps
    b = h.shape[0] // 2
    pb = PairBatch(s.logps[:b], s.logps[b:], s.counts[:b], s.counts[b:], r[:b], r[b:])
    return get_loss(loss_type).fn(pb, params)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "focal"])
def test_ghost_dots_equal_exact_per_pair_gradients(tied, loss_type):
    model, ref = policy_and_reference(tied)
    batch = make_batch(1)
    params = list(model.parameters())
    G = {p: torch.randn_like(p) for p in params}
    losses, _ = naive_pair_losses(model, ref, batch, loss_type)
    exact = torch.stack([
        sum((G[p] * g).sum() for p, g in zip(params, torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True))
            if g is not None)
        for i in range(B)])
    ghost = pair_gradient_dots(model, batch, G, loss_type, PARAMS, ref_model=ref, backend="torch")
    torch.testing.assert_close(ghost, exact.detach(), rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)  # nothing leaks into the training step


@pytest.mark.parametrize("reentrant", [False, True])
def test_meta_pass_keeps_gradient_checkpointing_and_turns_dropout_off(reentrant):
    """#15 item 3: the meta pass (deterministic_mode) keeps transformers' gradient checkpointing on
    (model.eval() turned it off) while dropout is off; the ghost dots are unchanged by it, and no
    parameter gradient is written (reentrant checkpoints refuse autograd.grad: a full backward, then
    the gradients are dropped)."""
    from metapo_fast.metapo.bilevel import deterministic_mode

    model, ref = policy_and_reference(False)
    model.config.attention_dropout = 0.5  # would make c random if dropout stayed on
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    batch = make_batch(1)
    G = {p: torch.randn_like(p) for p in model.parameters()}
    model.eval()
    plain = pair_gradient_dots(model, batch, G, "sigmoid", PARAMS, ref_model=ref, backend="torch")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = {"n": 0}
    for layer in model.model.layers:  # count this model's checkpointed layer calls
        def counted(*a, _f=layer._gradient_checkpointing_func, **k):
            calls["n"] += 1
            return _f(*a, **k)

        layer._gradient_checkpointing_func = counted
    with deterministic_mode(model):
        assert not model.model.layers[0].self_attn.training and model.model.layers[0].training
        ckpt = pair_gradient_dots(model, batch, G, "sigmoid", PARAMS, ref_model=ref, backend="torch")
    assert calls["n"] >= len(model.model.layers)  # every decoder layer was checkpointed
    assert model.training and model.model.layers[0].self_attn.training  # restored
    torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_uncovered_parameter_is_named():
    model = tiny_llama(False)
    model.model.extra = nn.Conv1d(2, 2, 1).double()  # a parameter kind with no ghost formula
    G = {p: torch.ones_like(p) for p in model.parameters()}
    with pytest.raises(GhostCoverageError, match="model.extra.weight"):
        pair_gradient_dots(model, make_batch(2), G, "sigmoid", PARAMS, ref_model=copy.deepcopy(model), backend="torch")


def exact_lookahead_phi_grad(model, ref, net, feats, train, val, eta, lam, val_objective="sigmoid", precond=None):
    """dL_meta(theta')/dphi with theta' = theta - eta P grad (1/B) sum_i w_phi(s_i) l_i, by double backward
    (``precond``: {parameter name: the diagonal of P}; None = P = 1)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    w = net(feats)
    l_train, _ = naive_pair_losses(model, ref, train)
    grads = torch.autograd.grad((w * l_train).mean(), params, create_graph=True)
    new = {n: p - eta * (g if precond is None else precond[n] * g) for n, p, g in zip(names, params, grads)}
    look = copy.deepcopy(model)

    def fwd(batch):
        h = torch.func.functional_call(look.model, {k[len("model."):]: v for k, v in new.items() if k.startswith("model.")},
                                       (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).last_hidden_state
        return h

    h = fwd(val)
    s = sequence_logps(h, new["lm_head.weight"] if "lm_head.weight" in new else new["model.embed_tokens.weight"], val["labels"])
    with torch.no_grad():
        rh = ref.model(input_ids=val["input_ids"], attention_mask=val["attention_mask"]).last_hidden_state
        r = sequence_logps(rh, ref.lm_head.weight, val["labels"]).logps
    b = h.shape[0] // 2
    z = PARAMS.beta * ((s.logps[:b] - r[:b]) - (s.logps[b:] - r[b:]))
    pos = (z > 0).double()
    l_val = -torch.nn.functional.logsigmoid(z) if val_objective == "log" else torch.sigmoid(-z)
    l_meta = l_val.mean() + lam * (-(z * pos).sum() / pos.sum().clamp(min=1))
    return torch.autograd.grad(l_meta, list(net.parameters()))


@pytest.mark.parametrize("normalize,val_objective", [("none", "log"), ("batch_mean", "log"), ("batch_mean", "sigmoid")])
def test_phi_gradient_equals_double_backward_lookahead(normalize, val_objective):
    """First-order meta-gradient vs the exact lookahead at small eta (float64): rel err ~ eta."""
    model = tiny_llama(False)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    train, val = make_batch(3), make_batch(4, b=4)
    torch.manual_seed(0)
    net = MetaWeightNet(normalize=normalize).double()
    with torch.no_grad():
        net.v.copy_(torch.randn(6) * 0.5)
    feats = torch.randn(B, 6, dtype=torch.float64)
    eta = 1e-6
    learner = MetaLearner(net, inner_lr=eta, lambda_margin=0.1, loss_params=PARAMS, backend="torch", val_objective=val_objective)
    learner.phi_gradient(model, train, val, feats.float(), ref_model=ref)
    ours = [p.grad.clone().double() for p in net.parameters()]
    net.zero_grad()
    exact = exact_lookahead_phi_grad(model, ref, net, feats.float().double(), train, val, eta, 0.1, val_objective)
    num = sum(((a - b) ** 2).sum() for a, b in zip(ours, exact)).sqrt()
    den = sum((b ** 2).sum() for b in exact).sqrt()
    assert den > 0 and num / den < 2e-4, f"relative error {float(num / den):.2e}"  # observed 1e-5 .. 5e-5 at eta=1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_adam_preconditioned_phi_gradient_equals_the_preconditioned_lookahead(tied):
    """meta.preconditioner=adam: the phi gradient equals the double-backward lookahead of the step
    theta - eta P grad with P = 1 / (sqrt(v_hat) + eps) from the policy's AdamW (float64), and it
    differs from the identity preconditioner's."""
    from metapo_fast.metapo.bilevel import adam_preconditioned

    model = tiny_llama(tied)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    g = torch.Generator().manual_seed(5)
    for k in range(3):  # non-uniform second moments: per-parameter gradient scales spread over 1e-3 .. 1
        for i, p in enumerate(model.parameters()):
            scale = 10.0 ** -(torch.rand(p.shape, generator=g, dtype=torch.float64) * 3)
            p.grad = scale * torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    opt.zero_grad(set_to_none=True)
    train, val = make_batch(3), make_batch(4, b=4)
    torch.manual_seed(0)
    net = MetaWeightNet(normalize="batch_mean").double()
    with torch.no_grad():
        net.v.copy_(torch.randn(6) * 0.5)
    feats = torch.randn(B, 6, dtype=torch.float64)
    eta = 1e-8  # P reaches ~1e3 here, so eta * P ~ 1e-5: the first-order error stays ~1e-5 (2e-3 at eta = 1e-6)
    ones = {p: torch.ones_like(p) for p in model.parameters()}
    P = adam_preconditioned(ones, opt)
    names = {id(p): n for n, p in model.named_parameters()}
    precond = {names[id(p)]: d for p, d in P.items()}
    bc2 = 1 - 0.999 ** 3
    for p in model.parameters():  # the helper's P is Adam's own denominator
        torch.testing.assert_close(P[p], 1 / ((opt.state[p]["exp_avg_sq"] / bc2).sqrt() + 1e-6))
    grads = {}
    for pre in ("adam", "none"):
        learner = MetaLearner(net, inner_lr=eta, lambda_margin=0.1, loss_params=PARAMS, backend="torch",
                              preconditioner=pre, inner_optimizer=opt)
        learner.phi_gradient(model, train, val, feats.float(), ref_model=ref)
        grads[pre] = torch.cat([p.grad.clone().double().reshape(-1) for p in net.parameters()])
    net.zero_grad()
    exact = torch.cat([g.reshape(-1) for g in exact_lookahead_phi_grad(model, ref, net, feats.float().double(), train, val, eta,
                                                                     0.1, precond=precond)])
    rel = float((grads["adam"] - exact).norm() / exact.norm())
    assert exact.norm() > 0 and rel < 2e-4, f"relative error {rel:.2e}"  # observed 1.9e-5 (2e-3 at eta = 1e-6: first order)
    assert float((grads["none"] - exact).norm() / exact.norm()) > 0.1  # the test sees the preconditioner


def test_adam_preconditioner_needs_the_inner_optimizer():
    model, ref = policy_and_reference(False)
    learner = MetaLearner(MetaWeightNet().double(), loss_params=PARAMS, backend="torch", preconditioner="adam")
    with pytest.raises(RuntimeError, match="inner_optimizer"):
        learner.phi_gradient(model, make_batch(3), make_batch(4), torch.randn(B, 6), ref_model=ref)
    with pytest.raises(ValueError, match="preconditioner"):
        MetaLearner(MetaWeightNet(), preconditioner="shampoo")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_ghost_dots_against_float64(dtype, tol):
    """The same model and direction in fp32 / bf16: ghost c vs the float64 exact value."""
    m64 = tiny_llama(False)
    ref64 = copy.deepcopy(m64)
    batch = make_batch(5)
    params = list(m64.parameters())
    G = {p: torch.randn_like(p) for p in params}
    losses, _ = naive_pair_losses(m64, ref64, batch)
    exact = torch.stack([sum((G[p] * g).sum() for p, g in zip(params, torch.autograd.grad(losses[i], params, retain_graph=True)))
                         for i in range(B)]).detach()
    lo, ref_lo = copy.deepcopy(m64).to(dtype), copy.deepcopy(ref64).to(dtype)
    G_lo = {pl: G[p].to(dtype) for pl, p in zip(lo.parameters(), params)}
    c = pair_gradient_dots(lo, batch, G_lo, "sigmoid", PARAMS, ref_model=ref_lo, backend="torch")
    rel = (c - exact).norm() / exact.norm()
    assert rel < tol, f"{dtype}: relative error {float(rel):.2e}"


def test_head_ghost_pass_makes_no_float64_copy_of_the_logits():
    """#14 item 6: the LM-head ghost pass sums <dl/dlogits, G_W h> in float64 without a float64
    [rows, V] tensor (at V = 128k that copy was ~8 GB per chunk); it still equals the float64 value."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from metapo_fast.metapo.ghost import head_ghost_dots

    torch.manual_seed(0)
    n2, t, h, v = 4, 7, 16, 300
    hidden, w, gw = torch.randn(n2, t, h), torch.randn(v, h) * 0.1, torch.randn(v, h)
    labels = torch.randint(0, v, (n2, t))
    labels[:, :2] = -100
    coef = torch.randn(n2)
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and o.dtype == torch.float64:
                    seen.append(o.numel())
            return out

    with Watch():
        c = head_ghost_dots(hidden, w, None, labels, coef, gw, None, num_pairs=2, backend="torch")
    assert max(seen) < v, f"a float64 tensor of {max(seen)} elements (logits-sized: {n2 * t * v})"
    # float64 reference: sum over labelled tokens of coef_s * <onehot - softmax, G_W h>, sequences s and s+2 -> pair s % 2
    h64, w64, g64 = hidden.double(), w.double(), gw.double()
    logits = h64 @ w64.t()
    grad = torch.nn.functional.one_hot(labels.clamp(min=0), v).double() - logits.softmax(-1)
    per_tok = (grad * (h64 @ g64.t())).sum(-1) * (labels != -100) * coef.double()[:, None]
    want = per_tok.sum(1).reshape(2, 2).sum(0)
    torch.testing.assert_close(c, want, rtol=1e-4, atol=1e-6)


def test_meta_learner_state_round_trip_gives_identical_next_update():
    model = tiny_llama(False)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    train, val = make_batch(6), make_batch(7)
    feats = torch.randn(B, 6)
    a = MetaLearner(MetaWeightNet().double(), inner_lr=1e-2, loss_params=PARAMS, backend="torch")
    a.step(model, train, val, feats, ref_model=ref)
    b = MetaLearner(MetaWeightNet().double(), inner_lr=1e-2, loss_params=PARAMS, backend="torch")
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.step(model, train, val, feats, ref_model=ref)
    b.step(model, train, val, feats, ref_model=ref)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    assert a.updates == b.updates == 2 and a.net.v.abs().sum() > 0
    with pytest.raises(ValueError, match="interval"):
        MetaLearner(MetaWeightNet(), interval=0)
    with pytest.raises(ValueError, match="start_step"):
        MetaLearner(MetaWeightNet(), start_step=-1)
    late = MetaLearner(MetaWeightNet(), interval=3, start_step=7)
    assert [t for t in range(1, 16) if late.due(t)] == [9, 12, 15]
    assert [t for t in range(1, 8) if MetaLearner(MetaWeightNet(), interval=3).due(t)] == [3, 6]


def test_precomputed_reference_logps_give_the_same_dots():
    """A training batch that carries its reference log-probs (as the trainer's does) skips the
    reference forward and gives the same c_i."""
    model, ref = policy_and_reference(False)
    batch = make_batch(8)
    G = {p: torch.randn_like(p) for p in model.parameters()}
    with torch.no_grad():
        rh = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref_logps = sequence_logps(rh, ref.lm_head.weight, batch["labels"]).logps
    a = pair_gradient_dots(model, batch, G, "sigmoid", PARAMS, ref_model=ref, backend="torch")
    b = pair_gradient_dots(model, {**batch, "ref_logps": ref_logps}, G, "sigmoid", PARAMS, ref_model=None, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _split_pairs(batch, groups):
    """Micro-batches holding the given pair indices (chosen rows then rejected rows each)."""
    b = batch["input_ids"].shape[0] // 2
    out = []
    for g in groups:
        rows = torch.tensor(list(g) + [i + b for i in g])
        out.append({k: v[rows] for k, v in batch.items()})
    return out


@pytest.mark.parametrize("normalize", ["none", "batch_mean"])
def test_phi_gradient_over_micro_batches_equals_the_lookahead_over_the_whole_step(normalize):
    """The meta-update sees every micro-batch of the step: its phi gradient over two micro-batches
    equals the double-backward lookahead of one step on their union (float64, eta = 1e-6)."""
    model = tiny_llama(False)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    full, val = make_batch(3, b=4), make_batch(4, b=4)
    micro = _split_pairs(full, [(0, 1), (2, 3)])
    torch.manual_seed(0)
    net = MetaWeightNet(normalize=normalize).double()
    with torch.no_grad():
        net.v.copy_(torch.randn(6) * 0.5)
    feats = torch.randn(4, 6, dtype=torch.float64)
    eta = 1e-6
    learner = MetaLearner(net, inner_lr=eta, lambda_margin=0.1, loss_params=PARAMS, backend="torch")
    learner.phi_gradient(model, micro, val, feats.float(), ref_model=ref)
    ours = [p.grad.clone().double() for p in net.parameters()]
    net.zero_grad()
    exact = exact_lookahead_phi_grad(model, ref, net, feats.float().double(), full, val, eta, 0.1)
    num = sum(((a - b) ** 2).sum() for a, b in zip(ours, exact)).sqrt()
    den = sum((b ** 2).sum() for b in exact).sqrt()
    assert den > 0 and num / den < 2e-4, f"relative error {float(num / den):.2e}"
    # only the first micro-batch: a different (wrong) gradient
    net.zero_grad()
    learner.phi_gradient(model, micro[:1], val, feats[:2].float(), ref_model=ref)
    part = [p.grad.clone().double() for p in net.parameters()]
    assert sum(((a - b) ** 2).sum() for a, b in zip(part, exact)).sqrt() / den > 1e-2
    with pytest.raises(ValueError, match="feature rows"):
        learner.phi_gradient(model, micro, val, feats[:3].float(), ref_model=ref)


@pytest.mark.parametrize("optimizer,entropy", [("adam", 0.0), ("sgd", 0.0), ("adam", 0.5)])
def test_phi_step_is_independent_of_the_inner_learning_rate(optimizer, entropy):
    """The phi step uses dL_meta/dphi per unit of eta: the same step at eta = 5e-7 (the paper's,
    where the raw gradient sits under Adam's eps) as at eta = 1e-2. SGD steps have length lr."""
    model, ref = policy_and_reference(False)
    train, val = make_batch(6), make_batch(7)
    feats = torch.randn(B, 6)
    moved = []
    for eta in (5e-7, 1e-2):
        learner = MetaLearner(MetaWeightNet().double(), lr=0.05, inner_lr=eta, loss_params=PARAMS, backend="torch",
                              optimizer=optimizer, entropy_coef=entropy)  # the entropy term is not scaled by 1/eta
        with torch.no_grad():
            learner.net.v.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0, 0.2, -0.1]))  # weights not all equal: entropy has a gradient
        learner.step(model, train, val, feats, ref_model=ref)
        moved.append(torch.cat([learner.net.v.detach() - torch.tensor([0.3, -0.2, 0.1, 0.0, 0.2, -0.1], dtype=torch.float64),
                                learner.net.b.detach().reshape(1) - SOFTPLUS_INV_ONE]))
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-4, atol=1e-9)
    assert moved[0].abs().max() > 1e-3
    if optimizer == "sgd":
        assert float(moved[0].norm()) == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        MetaLearner(MetaWeightNet(), optimizer="rmsprop")


def test_step_gradient_is_the_lookahead_per_unit_eta_plus_the_entropy_term():
    """What MetaLearner.step optimises: dL/dphi / eta for the lookahead, and the entropy bonus as is
    (scaling it by 1/eta too would make it 2e6 times stronger at the paper's eta = 5e-7)."""
    model, ref = policy_and_reference(False)
    train, val = make_batch(6), make_batch(7)
    feats = torch.randn(B, 6)
    eta, coef = 1e-3, 0.5
    v0 = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.2, -0.1])

    def grads(entropy, per_unit):
        learner = MetaLearner(MetaWeightNet(normalize="batch_mean").double(), inner_lr=eta, loss_params=PARAMS, backend="torch",
                              entropy_coef=entropy)
        with torch.no_grad():
            learner.net.v.copy_(v0)
        learner.phi_gradient(model, train, val, feats, ref_model=ref, per_unit_eta=per_unit)
        return torch.cat([learner.net.v.grad.double(), learner.net.b.grad.double().reshape(1)]), learner.net

    lookahead, net = grads(0.0, False)
    net.zero_grad()
    w = net(feats)
    q = w / w.sum()
    (coef * (q * q.log()).sum()).backward()
    entropy = torch.cat([net.v.grad.double(), net.b.grad.double().reshape(1)])
    combined, _ = grads(coef, True)
    torch.testing.assert_close(combined, lookahead / eta + entropy, rtol=1e-5, atol=1e-7)
    assert entropy.abs().max() > 1e-4 and lookahead.abs().max() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_update_leaves_the_steps_gradients_untouched(checkpointing):
    """The trainer and the TRL integration call MetaLearner.step between the step's backwards and its
    optimiser step without setting p.grad aside: neither meta backward may write, replace or clear a
    parameter's gradient (non-reentrant checkpointing, as the trainer enables it, and without)."""
    model, ref = policy_and_reference(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    grads = {p: (torch.randn_like(p),) for p in model.parameters()}
    grads = {p: (g, g.clone()) for p, (g,) in grads.items()}
    for p, (g, _) in grads.items():
        p.grad = g
    learner = MetaLearner(MetaWeightNet().double(), lr=0.01, inner_lr=1e-3, loss_params=PARAMS, backend="torch")
    learner.step(model, [make_batch(3), make_batch(4)], make_batch(5), torch.randn(2 * B, 6, dtype=torch.float64), ref_model=ref)
    assert learner.updates == 1
    for p, (g, v) in grads.items():
        assert p.grad is g and p.requires_grad  # the same tensor, and the ghost pass's freeze undone
        assert torch.equal(g, v)  # its values: nothing accumulated into it


def test_meta_gradient_holds_one_model_sized_copy():
    """#15 item 3: the validation backward's gradients become g_meta without a copy. Peak bytes of the
    tensors the meta-gradient creates, in units of the model's parameter bytes, on a model whose
    decoder layers hold most parameters (as an LLM's do): ~1 (its gradients) plus activations and
    the fused head's [V, H] gradient buffers; cloning the gradients (as before) made it ~2."""
    from benchmarks.counters import Counters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    learner = MetaLearner(MetaWeightNet(), lr=0.01, interval=1, inner_lr=1e-3, loss_params=PARAMS, backend="torch")
    with Counters(vocab=V) as c:
        G, _ = learner.meta_gradient(model, make_batch(1, b=2, t=6), ref)  # few tokens: activations << parameters
        peak = c.peak
    assert sum(g.numel() * g.element_size() for g in G.values()) == param_bytes
    assert all(p.grad is None for p in model.parameters())
    assert peak < 1.3 * param_bytes, f"meta-gradient peak {peak / param_bytes:.2f} x the parameter bytes"


def test_ghost_dots_on_the_cuda_row_rule_with_host_labels_are_unchanged_and_drop_unlabelled_rows():
    """pair_gradient_dots passes the batch's host labels to the LM-head ghost pass: on the CUDA row
    rule (forced on CPU) the dots equal the every-row computation and the float64 exact value, and
    the head's GEMMs see labelled rows only (counted: 2 GEMMs of N_loss x H x V, not N x H x V)."""
    from unittest import mock

    from metapo_fast.metapo import bilevel, ghost
    from metapo_fast.ops.chunking import force_row_rule

    model, ref = policy_and_reference(False)
    batch = make_batch(2)
    params = list(model.parameters())
    G = {p: torch.randn_like(p) for p in params}
    losses, _ = naive_pair_losses(model, ref, batch)
    exact = torch.stack([sum((G[p] * g).sum() for p, g in zip(params, torch.autograd.grad(losses[i], params, retain_graph=True,
                                                                                         allow_unused=True)) if g is not None)
                         for i in range(B)]).detach()
    rows_seen = []
    real = ghost.head_ghost_dots

    def spy(*a, **k):
        orig = ghost.lce_epilogue_forward

        def counted(logits, *aa, **kk):  # one call per logits chunk: the rows its GEMMs saw
            rows_seen.append(logits.shape[0])
            return orig(logits, *aa, **kk)
        with mock.patch.object(ghost, "lce_epilogue_forward", counted):
            return real(*a, **k)

    got = {}
    with force_row_rule(False), mock.patch.object(bilevel, "head_ghost_dots", spy):
        got["host"] = pair_gradient_dots(model, batch, G, "sigmoid", PARAMS, ref_model=ref, backend="torch")
        n_host = sum(rows_seen)
        rows_seen.clear()
        with mock.patch.object(bilevel, "head_ghost_dots", lambda *a, **k: spy(*a, **{**k, "host_labels": None})):
            got["bare"] = pair_gradient_dots(model, batch, G, "sigmoid", PARAMS, ref_model=ref, backend="torch")
        n_bare = sum(rows_seen)
    torch.testing.assert_close(got["host"], got["bare"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["host"], exact, rtol=1e-10, atol=1e-12)
    n_loss = int((batch["labels"] != -100).sum())
    assert n_host == n_loss and n_bare == batch["labels"].numel() > n_loss
