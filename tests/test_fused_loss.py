"""fused_linear_preference_loss against a float64 naive full-logits reference (docs/math.md 1-2).

Every output (loss, per-pair log-probs, reference log-probs, margins, KL) and every gradient
(hidden, weight, bias) is compared, for every loss type, with and without reference / KL /
weights / bias, with a fully masked response, on odd shapes, in fp32 and bf16, for each epilogue
backend (torch reference, Triton under the interpreter, C++), through both chunking paths
(whole pairs per chunk, and the two-phase token-chunked path).
"""
import contextlib

import pytest
import torch

from metapo_fast.ops.chunking import force_row_rule
from metapo_fast.ops.dispatch import cpp_compiler_present
from metapo_fast.ops.preference_loss import FusedLinearPreferenceLoss, fused_linear_preference_loss
from metapo_fast.losses import LOSSES, LossParams, PairBatch, pair_loss
from tests.naive import sequence_logps

B, T, H, V = 3, 47, 31, 123
BACKENDS = ["torch", "triton", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_compiler_present(), reason="no C++ compiler on PATH"))]
# chunk budgets: the default (whole pairs, single pass) and 40 rows of logits (a pair has 2T=94 rows:
# the streamed-pair path)
PATHS = {"single": 256 * 1024 * 1024, "streamed": 40 * V * 4 * 2}


def make_inputs(dtype, seed=0, bias=False, ref="hidden", weights=False, b=B, t=T, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(2 * b, t, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    for r in range(2 * b):  # prompts of varying length, right padding
        p = int(torch.randint(1, t // 2, (1,), generator=g))
        labels[r, :p] = -100
        labels[r, t - int(torch.randint(0, 5, (1,), generator=g)):] = -100
    labels[b + 1] = -100  # a fully masked rejected response
    kw = {}
    if bias:
        kw["bias"] = torch.randn(v, generator=g, dtype=torch.float64)
    if ref == "hidden":
        kw["ref_hidden"] = hid + 0.3 * torch.randn(hid.shape, generator=g, dtype=torch.float64)
        kw["ref_weight"] = w + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    elif ref == "logps":
        kw["ref_logps"] = -torch.rand(2 * b, generator=g, dtype=torch.float64) * 50
    if weights:
        kw["sample_weights"] = torch.rand(b, generator=g, dtype=torch.float64) * 2
    cast = {k: (x.to(dtype) if k not in ("ref_logps", "sample_weights") else x.float()) for k, x in kw.items()}
    return hid.to(dtype), w.to(dtype), labels, cast


def naive(hidden, weight, labels, loss_type, params, **kw):
    """Full-logits reference: differentiable wrt hidden, weight, bias."""
    bsz = hidden.shape[0] // 2
    s = sequence_logps(hidden, weight, labels, bias=kw.get("bias"), ref_hidden=kw.get("ref_hidden"),
                       ref_weight=kw.get("ref_weight"), compute_kl=True)
    ref = s.ref_logps if "ref_hidden" in kw else kw.get("ref_logps")
    batch = PairBatch(s.logps[:bsz], s.logps[bsz:], s.counts[:bsz], s.counts[bsz:],
                      None if ref is None else ref[:bsz].to(s.logps.dtype), None if ref is None else ref[bsz:].to(s.logps.dtype))
    w = kw.get("sample_weights")
    loss, per_pair, z = pair_loss(batch, loss_type, params, None if w is None else w.to(s.logps.dtype))
    kl = None
    if s.kl_sum is not None:
        kl = (s.kl_sum[:bsz] + s.kl_sum[bsz:]) / (s.counts[:bsz] + s.counts[bsz:]).clamp(min=1)
    return loss, per_pair, z, s.logps, ref, kl


def run_both(dtype, loss_type, backend, path, row_rule=None, **mk):
    """Ours (``row_rule``: None = the device's; "row" = the CUDA row path, every row through the
    GEMMs; "row_host" = the CUDA path given the host's labels) and the float64 naive truth."""
    hid, w, labels, kw = make_inputs(dtype, **mk)
    params = LossParams(beta=0.3, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, focal_gamma=1.5)
    leaves = {"hidden": hid.clone().requires_grad_(), "weight": w.clone().requires_grad_()}
    if "bias" in kw:
        leaves["bias"] = kw["bias"].clone().requires_grad_()
    other = {k: x for k, x in kw.items() if k != "bias"}
    with force_row_rule(row_rule is None) if row_rule else contextlib.nullcontext():
        out = fused_linear_preference_loss(leaves["hidden"], leaves["weight"], labels, bias=leaves.get("bias"), **other,
                                           loss_type=loss_type, beta=params.beta, label_smoothing=params.label_smoothing,
                                           focal_gamma=params.focal_gamma, backend=backend, chunk_bytes=PATHS[path],
                                           host_labels=labels.clone() if row_rule == "row_host" else None)
        out.loss.backward()
    got_grads = {k: x.grad for k, x in leaves.items()}
    # float64 truth from the same (rounded) inputs
    l64 = {k: x.detach().double().requires_grad_() for k, x in leaves.items()}
    kw64 = {k: (x.double() if k not in ("ref_logps", "sample_weights") else x.double()) for k, x in other.items()}
    t_loss, t_pp, t_z, t_seq, t_ref, t_kl = naive(l64["hidden"], l64["weight"], labels, loss_type, params, bias=l64.get("bias"), **kw64)
    t_loss.backward()
    return out, got_grads, (t_loss, t_pp, t_z, t_seq, t_ref, t_kl), {k: x.grad for k, x in l64.items()}, (hid, w, labels, kw, params)


def _close(got, want, tol, what):
    got = got.double()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max abs error {err:.3e} > {tol:.1e} * max(|ref|={scale:.3e}, 1)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_fp32_matches_float64_reference(loss_type, path, backend):
    ref = "hidden" if LOSSES[loss_type].needs_reference else None
    out, grads, truth, tgrads, ctx = run_both(torch.float32, loss_type, backend, path, ref=ref, weights=True, bias=(loss_type == "sigmoid"))
    t_loss, t_pp, t_z, t_seq, t_ref, t_kl = truth
    tol = 2e-5  # fp32 GEMMs over H=31 and log-sum-exp over V=123: observed ~1e-6
    _close(out.loss.detach(), t_loss.detach(), tol, "loss")
    _close(out.per_pair_loss, t_pp.detach(), tol, "per_pair_loss")
    _close(out.margins, t_z.detach(), tol, "margins")
    _close(torch.cat([out.chosen_logps, out.rejected_logps]), t_seq.detach(), tol, "logps")
    assert out.chosen_counts.tolist() + out.rejected_counts.tolist() == (ctx[2] != -100).sum(1).tolist()
    if ref:
        _close(torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]), t_ref, tol, "ref_logps")
        _close(out.kl, t_kl, tol, "kl")
    for k in tgrads:
        _close(grads[k], tgrads[k], tol, f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("row_rule", ["row", "row_host"])
def test_cuda_row_path_forced_on_cpu(row_rule, path, backend):
    """The CUDA code path (no device-side row compaction) on CPU tensors: every row through the
    GEMMs with a zero coefficient on prompt/padding rows, or rows chosen on the host."""
    out, grads, truth, tgrads, ctx = run_both(torch.float32, "sigmoid", backend, path, row_rule=row_rule, weights=True, bias=True)
    tol = 2e-5
    _close(out.loss.detach(), truth[0].detach(), tol, "loss")
    _close(out.kl, truth[5], tol, "kl")
    for k in tgrads:
        _close(grads[k], tgrads[k], tol, f"grad {k}")


@pytest.mark.parametrize("v,backend", [(9000, "torch"), (9000, "triton"), (32003, "cpp"), (32003, "triton"),
                                       (128256, "cpp"), (128256, "torch")])
@pytest.mark.parametrize("path", ["single", "streamed"])
def test_large_odd_vocabularies(v, backend, path):
    """The whole op at V = 9000, 32003 (odd) and Llama-3's 128256 (small H): the log-sum-exp runs
    over many vocabulary blocks in every backend. fp32 vs float64: relative 1e-4 (sums of
    ~20 log-probs of magnitude log V ~ 12)."""
    if backend == "cpp" and not cpp_compiler_present():
        pytest.skip("no C++ compiler on PATH")
    b, t, h = 2, 9, 8
    hid, w, labels, kw = make_inputs(torch.float32, seed=3, b=b, t=t, h=h, v=v, weights=True)
    budget = 256 * 1024 * 1024 if path == "single" else 5 * v * 4 * 2
    leaves = [hid.clone().requires_grad_(), w.clone().requires_grad_()]
    out = fused_linear_preference_loss(*leaves, labels, **kw, backend=backend, chunk_bytes=budget)
    out.loss.backward()
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    t_loss, _, t_z, t_seq, _, t_kl = naive(*l64, labels, "sigmoid", LossParams(), **{k: x.double() for k, x in kw.items()})
    t_loss.backward()
    tol = 1e-4
    _close(out.loss.detach(), t_loss.detach(), tol, "loss")
    _close(torch.cat([out.chosen_logps, out.rejected_logps]), t_seq.detach(), tol, "logps")
    _close(out.kl, t_kl.detach(), tol, "kl")
    for g, t_ in zip(leaves, l64):
        _close(g.grad, t_.grad, tol, "grad")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("row_rule", [None, "row", "row_host"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo"])
def test_weights_fn_single_pass_equals_two_passes(loss_type, row_rule, path):
    """MetaPO's per-chunk weights callback (one pass, 8NHV) gives the values and gradients of the
    two-pass form (a no-grad pass for the statistics, weights from them, then the gradient pass),
    in float64; the callback sees each pair once, with that pair's statistics."""
    ref = "hidden" if LOSSES[loss_type].needs_reference else None
    hid, w, labels, kw = make_inputs(torch.float64, seed=5, bias=True, ref=ref)
    bias = kw.pop("bias")

    def wfn_batch(st):  # a per-pair function of the statistics (margin, KL, log-probs)
        kl = st.kl if st.kl is not None else torch.zeros_like(st.margins)
        return torch.sigmoid(-st.margins) + 0.5 * kl + 0.01 * st.chosen_logps.tanh()

    seen = []

    def wfn(pairs, st):
        seen.append(pairs.clone())
        assert st.margins.shape == pairs.shape
        return wfn_batch(st)

    ctx = force_row_rule(row_rule is None) if row_rule else contextlib.nullcontext()
    host = labels.clone() if row_rule == "row_host" else None
    common = dict(loss_type=loss_type, backend="torch", chunk_bytes=PATHS[path] * 2, host_labels=host)
    with ctx:
        a = [x.clone().requires_grad_() for x in (hid, w, bias)]
        one = fused_linear_preference_loss(a[0], a[1], labels, bias=a[2], **kw, weights_fn=wfn, **common)
        one.loss.backward()
        b = [x.clone().requires_grad_() for x in (hid, w, bias)]
        with torch.no_grad():
            stats = fused_linear_preference_loss(b[0], b[1], labels, bias=b[2], **kw, **common)
        ws = wfn_batch(stats)
        two = fused_linear_preference_loss(b[0], b[1], labels, bias=b[2], **kw, sample_weights=ws, **common)
        two.loss.backward()
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(B))
    torch.testing.assert_close(one.sample_weights, ws, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.loss, two.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.margins, two.margins, rtol=1e-12, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    # and the weights matter: unweighted gradients differ
    assert not torch.allclose(ws, torch.ones_like(ws))


def test_weights_fn_refuses_sample_weights_too():
    hid, w, labels, kw = make_inputs(torch.float32, weights=True)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_preference_loss(hid, w, labels, **kw, weights_fn=lambda p, s: torch.ones_like(s.margins))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_bf16_error_at_most_twice_pytorch_bf16(loss_type, path, backend):
    """Our bf16 error vs float64 must be <= 2x the error of naive PyTorch run in bf16 (+ a floor of
    one bf16 ulp of the quantity, for entries where PyTorch happens to be exact)."""
    ref = "hidden" if LOSSES[loss_type].needs_reference else None
    out, grads, truth, tgrads, (hid, w, labels, kw, params) = run_both(torch.bfloat16, loss_type, backend, path, ref=ref, weights=True)
    leaves = {"hidden": hid.clone().requires_grad_(), "weight": w.clone().requires_grad_()}
    p_loss, p_pp, p_z, p_seq, p_ref, p_kl = naive(leaves["hidden"], leaves["weight"], labels, loss_type, params, **kw)
    p_loss.backward()
    pairs = [("loss", out.loss.detach(), p_loss.detach(), truth[0].detach()),
             ("logps", torch.cat([out.chosen_logps, out.rejected_logps]), p_seq.detach(), truth[3].detach()),
             ("margins", out.margins, p_z.detach(), truth[2].detach()),
             ("grad hidden", grads["hidden"], leaves["hidden"].grad, tgrads["hidden"]),
             ("grad weight", grads["weight"], leaves["weight"].grad, tgrads["weight"])]
    if ref:
        pairs.append(("kl", out.kl, p_kl, truth[5]))
    for name, ours, torch_bf16, true in pairs:
        e_ours = (ours.double() - true).abs().max().item()
        e_torch = (torch_bf16.double() - true).abs().max().item()
        floor = 2 ** -8 * true.abs().max().item() * 0.5
        assert e_ours <= 2 * e_torch + floor, f"{name}: ours {e_ours:.3e} vs PyTorch bf16 {e_torch:.3e}"


@pytest.mark.parametrize("ref", ["logps", None])
def test_precomputed_reference_and_no_kl(ref):
    loss_type = "sigmoid" if ref else "orpo"
    out, grads, truth, tgrads, _ = run_both(torch.float32, loss_type, "torch", "single", ref=ref)
    _close(out.loss.detach(), truth[0].detach(), 2e-5, "loss")
    _close(grads["hidden"], tgrads["hidden"], 2e-5, "grad hidden")
    assert out.kl is None
    assert (out.ref_chosen_logps is None) == (ref is None)


def test_outputs_detached_weights_get_no_grad_and_kl_nonnegative():
    hid, w, labels, kw = make_inputs(torch.float32, weights=True)
    sw = kw.pop("sample_weights").requires_grad_()
    out = fused_linear_preference_loss(hid.requires_grad_(), w, labels, sample_weights=sw, **kw, backend="torch")
    out.loss.backward()
    assert sw.grad is None
    assert not out.chosen_logps.requires_grad and not out.margins.requires_grad
    assert (out.kl >= -1e-6).all()
    assert out.chosen_counts[1].item() > 0 and out.rejected_counts[1].item() == 0  # the fully masked response


def test_no_grad_mode_skips_gradients_and_backward_without_them_fails_clearly():
    hid, w, labels, kw = make_inputs(torch.float32)
    with torch.no_grad():
        out = fused_linear_preference_loss(hid, w, labels, **kw, backend="torch")
    assert out.loss.grad_fn is None and torch.isfinite(out.loss)


def test_matches_liger_fused_linear_dpo_loss():
    """Liger-Kernel's LigerFusedLinearDPOLoss (compiled=False): sigmoid, unweighted, no bias; its
    loss and gradients must match ours (it averages the same per-pair losses over B)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hid, w, labels, kw = make_inputs(torch.float32, ref="hidden")
    labels[B + 1, 5] = 3  # Liger divides by token counts: avoid its 0/0 on a fully masked row
    ours_h, ours_w = hid.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_preference_loss(ours_h, ours_w, labels, **kw, beta=0.1, backend="torch")
    out.loss.backward()
    lh, lw = hid.clone().requires_grad_(), w.clone().requires_grad_()
    fn = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True, average_log_prob=False)
    res = fn(lw, lh, labels, ref_input=kw["ref_hidden"], ref_weight=kw["ref_weight"])
    loss = res[0] if isinstance(res, tuple) else res
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_h.grad, lh.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, lw.grad, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph():
    hid, w, labels, kw = make_inputs(torch.float32)
    mod = FusedLinearPreferenceLoss(loss_type="sigmoid", beta=0.3, backend="torch")

    def f(h, wt):
        out = mod(h, wt, labels, **kw)
        return out.loss, out.margins

    h1, w1 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    l_eager, z_eager = f(h1, w1)
    l_eager.backward()
    h2, w2 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    l_comp, z_comp = torch.compile(f, fullgraph=True, backend="aot_eager")(h2, w2)
    l_comp.backward()
    torch.testing.assert_close(l_comp, l_eager)
    torch.testing.assert_close(z_comp, z_eager)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)



def test_out_of_range_label_is_refused_under_torch_compile_too():
    """The label values are checked in the op's body, so a compiled graph (where the check before the
    op is data-dependent and skipped) still refuses a label >= V instead of letting the C++ epilogue
    index past the row."""
    hid, w, labels, kw = make_inputs(torch.float32)
    bad = labels.clone()
    bad[1, 5] = w.shape[0] + 2
    mod = FusedLinearPreferenceLoss(loss_type="sigmoid", beta=0.3, backend="torch")
    with pytest.raises(Exception, match=rf"labels\[1, 5\] = {w.shape[0] + 2} is outside"):
        torch.compile(lambda h, wt: mod(h, wt, bad, **kw).loss, fullgraph=True, backend="aot_eager")(hid, w)

@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(hidden=a["hidden"][:5]), "even, non-zero number of rows"),
    (lambda a: a.update(hidden=a["hidden"][0]), r"\(2B, T, H\)"),
    (lambda a: a.update(weight=a["weight"][:, :7]), "weight must be"),
    (lambda a: a.update(weight=a["weight"].double()), "weight dtype"),
    (lambda a: a.update(labels=a["labels"][:, :5]), "labels must have shape"),
    (lambda a: a.update(labels=a["labels"].float()), "labels must be int64"),
    (lambda a: a["labels"].__setitem__((2, 40), V + 3), r"labels\[2, 40\] = 126 is outside"),
    (lambda a: a.update(ref_hidden=a["ref_hidden"][:, :3]), "ref_hidden must have shape"),
    (lambda a: a.update(ref_weight=a["ref_weight"][:7]), "ref_weight must be"),
    (lambda a: a.update(sample_weights=torch.ones(B + 1)), "sample_weights must have shape"),
    (lambda a: a.update(bias=torch.zeros(V + 1)), "bias must be"),
    (lambda a: a.update(ref_hidden=None, ref_weight=None), "needs a reference"),
    (lambda a: a.update(loss_type="kto"), "unknown loss_type"),
    (lambda a: a.update(beta=-1.0), "beta"),
    (lambda a: a.update(backend="cuda-magic"), "backend must be one of"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    hid, w, labels, kw = make_inputs(torch.float32)
    args = dict(hidden=hid, weight=w, labels=labels.clone(), **kw)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        fused_linear_preference_loss(**args)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("rule", [None, False])  # the CPU rule, and the CUDA row rule forced on CPU
def test_cpu_labels_are_their_own_mask_whatever_host_labels_say(backend, rule):
    """On CPU the op reads the labels' own values on the host: a host_labels copy that disagrees with
    them (here: two labelled rows marked ignored and two ignored rows marked labelled) changes
    nothing, where trusting it sent -100 into the epilogue."""
    if backend == "cpp" and not cpp_compiler_present():
        pytest.skip("no C++ compiler")
    hid, w, labels, kw = make_inputs(torch.float64)
    wrong = labels.clone()
    wrong[0, -1], wrong[1, 0] = 3, 3  # ignored rows (padding, prompt) marked labelled
    wrong[0, T // 2], wrong[2, T // 2 + 1] = -100, -100  # labelled rows marked ignored
    assert (wrong != labels).sum() == 4
    out = {}
    for name, host in (("none", None), ("wrong", wrong)):
        h, wt = hid.clone().requires_grad_(), w.clone().requires_grad_()
        with contextlib.nullcontext() if rule is None else force_row_rule(rule):
            o = fused_linear_preference_loss(h, wt, labels, backend=backend, host_labels=host, **kw)
        o.loss.backward()
        out[name] = (o.loss.detach(), o.chosen_counts, o.rejected_counts, h.grad, wt.grad)
    tol = 0 if rule is None else 1e-12  # the forced CUDA rule without host labels keeps every row: other sums
    for a, b in zip(out["none"], out["wrong"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("pregather", [True, False])
@pytest.mark.parametrize("path", ["single", "streamed"])
@pytest.mark.parametrize("row_rule", [None, "row", "row_host"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rows_gathered_once_or_block_by_block(loss_type, row_rule, path, pregather):
    """The chunker gathers the rows' hidden states once per call when they fit the budget (their
    buffer then holds the hidden-state gradient rows until the end) and block by block otherwise;
    both ways, on every row rule and both paths, match the float64 reference in every output and
    gradient (a logit loss with its closed form, and one with per-sequence coefficients)."""
    from metapo_fast.ops.preference_loss import force_pregather

    with force_pregather(pregather):
        out, grads, truth, tgrads, ctx = run_both(torch.float32, loss_type, "cpp" if cpp_compiler_present() else "torch",
                                                  path, row_rule=row_rule, weights=True, bias=True)
    t_loss, t_pp, t_z, t_seq, t_ref, t_kl = truth
    tol = 2e-5
    _close(out.loss.detach(), t_loss.detach(), tol, "loss")
    _close(out.per_pair_loss, t_pp.detach(), tol, "per_pair_loss")
    _close(out.margins, t_z.detach(), tol, "margins")
    _close(torch.cat([out.chosen_logps, out.rejected_logps]), t_seq.detach(), tol, "logps")
    _close(torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]), t_ref, tol, "ref_logps")
    _close(out.kl, t_kl, tol, "kl")
    for k in tgrads:
        _close(grads[k], tgrads[k], tol, f"grad {k}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("host", [True, False])
def test_on_the_gpu_matches_float64(host, path, dtype, monkeypatch):
    """On a GPU (the paths CPU tensors cannot reach: Triton's forward with the fused backward, the
    fp32 accumulators fed by bf16 GEMMs through addmm's out_dtype, pinned host copies, the bare rule):
    every output and gradient against the float64 reference, within the CPU tests' tolerances (fp32)
    or a bf16 one. The device's free memory would raise the streamed budget to whole pairs
    (``pair_rows_on_device``): the budget is kept, so "streamed" streams."""
    from metapo_fast.ops import preference_loss as pl

    monkeypatch.setattr(pl, "pair_rows_on_device", lambda rows, *a, **k: rows)
    streamed = []
    orig_init = pl._Chunker.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        streamed.append(self.streamed)

    monkeypatch.setattr(pl._Chunker, "__init__", init)
    hid, w, labels, kw = make_inputs(dtype, bias=True, weights=True)
    params = LossParams(beta=0.3, label_smoothing=0.1)
    dev = torch.device("cuda")
    leaves = {"hidden": hid.to(dev).requires_grad_(), "weight": w.to(dev).requires_grad_(), "bias": kw["bias"].to(dev).requires_grad_()}
    other = {k: x.to(dev) for k, x in kw.items() if k != "bias"}
    out = fused_linear_preference_loss(leaves["hidden"], leaves["weight"], labels.to(dev), bias=leaves["bias"], **other,
                                       beta=params.beta, label_smoothing=params.label_smoothing, chunk_bytes=PATHS[path],
                                       host_labels=labels.clone() if host else None)
    out.loss.backward()
    l64 = {k: x.detach().cpu().double().requires_grad_() for k, x in leaves.items()}
    kw64 = {k: x.double() for k, x in kw.items() if k != "bias"}
    t_loss, t_pp, t_z, t_seq, t_ref, t_kl = naive(l64["hidden"], l64["weight"], labels, "sigmoid", params, bias=l64["bias"], **kw64)
    t_loss.backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    _close(out.loss.detach().cpu(), t_loss.detach(), tol, "loss")
    _close(out.margins.cpu(), t_z.detach(), tol, "margins")
    _close(torch.cat([out.chosen_logps, out.rejected_logps]).cpu(), t_seq.detach(), tol, "logps")
    _close(out.kl.cpu(), t_kl, tol, "kl")
    for k, x in leaves.items():
        _close(x.grad.cpu(), l64[k].grad, tol, f"grad {k}")
    assert streamed == [path == "streamed"]
    assert not pl._OUT_DTYPE_FALLBACK, pl._OUT_DTYPE_FALLBACK  # bf16 GEMMs accumulated in fp32 without a temporary


def test_streamed_no_grad_pass_frees_each_blocks_reference_logits():
    """The no-grad pass (the trainer's statistics pass) holds one block's policy and reference
    logits at a time: when a block's logits are made, the previous block's are gone (a review
    finding: they lived on, 1.5 budgets of logits)."""
    import weakref

    from metapo_fast.ops import preference_loss as pl

    hid, w, labels, kw = make_inputs(torch.float32)
    live, orig = [], pl._Chunker._logits

    def logits(self, b):
        assert all(r() is None for r in live), f"block {b}: an earlier block's logits are still alive"
        out = orig(self, b)
        live.extend(weakref.ref(x) for x in out[1:] if x is not None)
        return out

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(pl._Chunker, "_logits", logits)
        out = fused_linear_preference_loss(hid, w, labels, **kw, chunk_bytes=PATHS["streamed"])
    assert len(live) >= 8 and out.loss.isfinite()


def test_host_labels_must_be_an_integer_cpu_copy():
    hid, w, labels, kw = make_inputs(torch.float32)
    for bad in (labels.float(), labels[:, :-1].clone()):
        with pytest.raises(ValueError, match="host_labels must be an integer CPU copy"):
            fused_linear_preference_loss(hid, w, labels, **kw, host_labels=bad)


@pytest.mark.gpu
def test_out_of_range_host_labels_are_refused_on_the_gpu():
    """On CUDA the targets are the host copy's values: they are checked there (no device read)."""
    hid, w, labels, kw = make_inputs(torch.float32)
    dev = torch.device("cuda")
    host = labels.clone()
    host[1, -1] = V + 5
    with pytest.raises(ValueError, match=r"labels\[1, 46\] = 128 is outside"):
        fused_linear_preference_loss(hid.to(dev), w.to(dev), labels.to(dev), **{k: x.to(dev) for k, x in kw.items()},
                                     host_labels=host)
