"""Padding-free packed sequences with varlen attention (metapo_fast.models.varlen): the pack plan, the
attention against dense masked SDPA in float64, the decoder's hidden states and gradients
packed vs padded, the meta-update's ghost dot products packed vs padded, and a training run."""
import copy
import json
import os

import pytest
import torch
from torch.nn import functional as F

from metapo_fast.models import varlen as V
from metapo_fast.metapo.bilevel import pair_gradient_dots
from metapo_fast.models.hf import last_hidden_states, pack_plan
from metapo_fast.train.cli import main
from tests.test_meta import PARAMS, make_batch, policy_and_reference, tiny_llama

LENGTHS = [13, 7, 1, 9, 12, 2]


def _mask(lengths, t):
    return (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


def test_pack_plan_layout_and_round_trip():
    mask = _mask([3, 1, 4], 5)
    p = V.PackPlan.from_mask(mask)
    assert p.index.tolist() == [0, 1, 2, 5, 10, 11, 12, 13]
    assert p.row.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 4 and p.shape == (3, 5)
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    packed = p.pack(x)
    assert packed.shape == (1, 8, 2)
    back = p.unpack(packed)
    torch.testing.assert_close(back, x * mask.unsqueeze(-1), rtol=0, atol=0)


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[1, 1, 0], [0, 1, 1]]), "row 1 is not right-padded"),
    (torch.tensor([[1, 0, 1]]), "row 0 is not right-padded"),
    (torch.tensor([[1, 1, 0], [0, 0, 0]]), "row 1 is empty"),
    (torch.ones(2, 3, 1), r"expected \(N, T\)"),
])
def test_pack_plan_rejects_what_it_cannot_pack(mask, match):
    with pytest.raises(ValueError, match=match):
        V.PackPlan.from_mask(mask)


def _dense_reference(q, k, v, lengths, t):
    """Padded (N, H, T, D) causal SDPA with the padding mask, float64, GQA by repetition."""
    n = len(lengths)
    mask = _mask(lengths, t).bool()
    plan = V.PackPlan.from_mask(mask)
    qd, kd, vd = (plan.unpack(x.unsqueeze(0)).transpose(1, 2) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kd, vd = kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal.unsqueeze(0) & mask.unsqueeze(1)  # (N, T, T)
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed.unsqueeze(1))
    return plan.pack(out.transpose(1, 2))[0], n


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
def test_varlen_attention_matches_dense_masked_sdpa_with_gradients(hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    t, d = max(LENGTHS), 8
    L = sum(LENGTHS)
    q, k, v = (torch.randn(L, h, d, dtype=torch.float64, generator=g).requires_grad_() for h in (hq, hkv, hkv))
    cu = V.PackPlan.from_mask(_mask(LENGTHS, t)).cu_seqlens
    out = V.varlen_attention(q, k, v, cu, max(LENGTHS))
    ref, _ = _dense_reference(q, k, v, LENGTHS, t)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    grads_ref = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_varlen_attention_rejects_bad_heads():
    q, k = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        V.varlen_attention_reference(q, k, k, torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize("torch_version", ["2.11", "2.13"])
@pytest.mark.parametrize("window", [None, 5])
def test_torch_varlen_attn_call_fits_each_torch_signature(monkeypatch, torch_version, window):
    """CPU twin of the CUDA call to torch's varlen_attn: torch 2.11's signature has no enable_gqa
    (the call used to pass it: a TypeError on the lent GPU's torch), so grouped-query heads are
    repeated first; 2.13's takes enable_gqa. Fakes with each signature compute through the
    reference; values and gradients must equal the reference's (float64, GQA 6/2 heads)."""
    import torch.nn.attention.varlen as tv

    def as_window(ws):
        assert ws[1] == 0, "causal attention is window_size (left, 0)"
        return None if ws[0] < 0 else ws[0] + 1

    def fake_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert query.shape[1] == key.shape[1], "torch 2.11's varlen_attn has no grouped-query attention"
        return V.varlen_attention_reference(query, key, value, cu_seq_q, scale=scale, window=as_window(window_size))

    def fake_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                 enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        assert enable_gqa == (query.shape[1] != key.shape[1])
        return V.varlen_attention_reference(query, key, value, cu_seq_q, scale=scale, window=as_window(window_size))

    monkeypatch.setattr(tv, "varlen_attn", fake_211 if torch_version == "2.11" else fake_213)
    g = torch.Generator().manual_seed(3)
    lengths = [9, 1, 14]
    L = sum(lengths)
    q, k, v = (torch.randn(L, h, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (6, 2, 2))
    cu = V.PackPlan.from_mask(_mask(lengths, max(lengths))).cu_seqlens
    left = -1 if window is None else window - 1
    out = V.torch_varlen_attn(q, k, v, cu.to(torch.int32), max(lengths), 0.3, (left, 0))
    ref = V.varlen_attention_reference(q, k, v, cu, scale=0.3, window=window)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{}, {"window": 17}, {"softcap": 2.0}])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attention_gpu_kernel_matches_reference(dtype, opts):
    """The CUDA kernel (flash-attn or torch's varlen_attn) against the per-sequence reference,
    plain causal, with a sliding window and with soft-capping."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths, d = [129, 7, 1, 300, 64], 64
    L = sum(lengths)
    q, k, v = (torch.randn(L, h, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for h in (8, 2, 2))
    cu = V.PackPlan.from_mask(_mask(lengths, max(lengths))).cu_seqlens.cuda()
    out = V.varlen_attention(q, k, v, cu, max(lengths), **opts)
    ref = V.varlen_attention_reference(*(x.double() for x in (q, k, v)), cu, **opts)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go.double())):
        torch.testing.assert_close(a.double(), b.double(), rtol=5 * tol, atol=5 * tol)


def _varlen(model):
    model.config._attn_implementation = V.register()
    return model


def _sdpa(model):
    # the padded baseline: SDPA with the padding mask (tiny_llama's eager attention takes its
    # softmax in float32, which would hide float64 differences)
    model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_decoder_equals_padded_decoder_values_and_gradients(checkpointing):
    """float64 tiny Llama (GQA): hidden states at real tokens and every parameter gradient of a
    loss on them are the same packed (varlen) and padded (SDPA with the padding mask)."""
    padded = _sdpa(tiny_llama(tied=False))
    packed = _varlen(copy.deepcopy(padded))
    if checkpointing:
        for m in (padded, packed):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
    t = max(LENGTHS)
    mask = _mask(LENGTHS, t)
    ids = torch.randint(0, padded.config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(3))
    w = torch.randn(len(LENGTHS), t, padded.config.hidden_size, dtype=torch.float64) * mask.unsqueeze(-1)
    outs = []
    for m in (padded, packed):
        h = last_hidden_states(m, ids, mask)
        (h * w).sum().backward()
        outs.append((h.detach() * mask.unsqueeze(-1), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) == len(list(padded.model.parameters()))
    for n in outs[0][1]:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], rtol=1e-9, atol=1e-11, msg=n)


def test_unpacked_call_on_a_varlen_model_is_plain_causal_sdpa():
    """A varlen-configured model still answers ordinary (unpacked) forwards, e.g. generate."""
    padded = _sdpa(tiny_llama(tied=True))
    packed = _varlen(copy.deepcopy(padded))
    ids = torch.randint(0, padded.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(packed(input_ids=ids).logits, padded(input_ids=ids).logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_ghost_dots_packed_equal_padded(tied):
    """The meta-update's c_i = <G, grad l_i> with packed varlen forwards equals the padded one."""
    model, ref = policy_and_reference(tied, attn="sdpa")
    batch = make_batch(2)
    G = {p: torch.randn_like(p) for p in model.parameters()}
    padded = pair_gradient_dots(model, batch, G, "sigmoid", PARAMS, ref_model=ref, backend="torch")
    pm, pr = _varlen(copy.deepcopy(model)), _varlen(copy.deepcopy(ref))
    Gp = {q: G[p] for p, q in zip(model.parameters(), pm.parameters())}
    assert pack_plan(pm, batch["attention_mask"]) is not None
    packed = pair_gradient_dots(pm, batch, Gp, "sigmoid", PARAMS, ref_model=pr, backend="torch")
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-12)


SMALL = ["data.synthetic.num_pairs=96", "data.synthetic.num_eval_pairs=16", "data.val_fraction=0.1",
         "train.per_device_batch_size=8", "train.sft_warmup_steps=5", "train.log_every=1", "train.eval_every=0",
         "meta.interval=3", "meta.val_batch_size=8", "train.max_steps=6"]


def test_training_run_with_varlen_equals_sdpa_run(tmp_path):
    """The same MetaPO run with padded SDPA and with packed varlen attention (fp32, CPU): the loss
    curve and the learned meta-network agree to float32 accuracy."""
    runs = {}
    for attn in ("sdpa", "varlen"):
        out = str(tmp_path / attn)
        assert main([*SMALL, f"train.output_dir={out}", f"model.attn_implementation={attn}"]) == 0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(l) for l in f if l.strip()]
        runs[attn] = ([r["loss"] for r in recs if "rewards/margins" in r],
                      json.load(open(os.path.join(out, "summary.json")))["coefficients"])
    (la, ca), (lb, cb) = runs["sdpa"], runs["varlen"]
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)
    for k in ca:
        if k == "bias":
            # Under batch_mean the bias's meta-gradient is exactly 0 while all weights are equal (the
            # first update, v = 0): what it gets is rounding noise (~1e-9), which Adam's per-coordinate
            # normalisation turns into steps of up to ~0.1 lr that differ between two attention
            # kernels. Bounded by 0.2 * lr * updates here; the MetaPO-weights issue tracks Adam on
            # noise-dominated coordinates.
            assert cb[k] == pytest.approx(ca[k], abs=0.2 * 0.03 * 2), k
        else:
            assert cb[k] == pytest.approx(ca[k], rel=1e-3, abs=1e-5), k


def test_packed_forward_reads_no_device_tensor_for_its_bounds(monkeypatch):
    """The per-sequence path gets the host copy of cu_seqlens (on a GPU, reading the tensor would
    be a device-to-host sync in every layer)."""
    seen = []
    real = V.varlen_attention_reference

    def spy(q, k, v, cu_seqlens, **kw):
        seen.append(cu_seqlens)
        return real(q, k, v, cu_seqlens, **kw)

    monkeypatch.setattr(V, "varlen_attention_reference", spy)
    model = _varlen(tiny_llama(tied=False))
    mask = _mask(LENGTHS, max(LENGTHS))
    last_hidden_states(model, torch.zeros_like(mask), mask)
    assert len(seen) == model.config.num_hidden_layers
    assert all(isinstance(b, (tuple, list)) and list(b) == V.PackPlan.from_mask(mask).cu_seqlens.tolist() for b in seen)


def _packed_vs_one_by_one(model, tol):
    """Hidden states of the packed varlen copy of ``model`` against ``model`` run on each sequence
    alone, unpadded (float64). One by one, because transformers' eager Gemma 2 turns whole padded
    rows into NaN."""
    packed = _varlen(copy.deepcopy(model))
    mask = _mask(LENGTHS, max(LENGTHS))
    ids = torch.randint(0, model.config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(1))
    got = last_hidden_states(packed, ids, mask)
    for r, n in enumerate(LENGTHS):
        torch.testing.assert_close(got[r, :n], last_hidden_states(model, ids[r:r + 1, :n])[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [4, max(LENGTHS)])
def test_sliding_window_matches_transformers(window):
    """Mistral's sliding window (shorter than most sequences, and covering all of them) against
    SDPA with transformers' windowed mask."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=32, sliding_window=window)
    cfg._attn_implementation = "sdpa"
    _packed_vs_one_by_one(MistralForCausalLM(cfg).double(), 1e-10)


def test_softcap_and_alternating_windows_match_transformers_gemma2():
    """Gemma 2: logit soft-capping on every layer, a window on every other one. The baseline is
    transformers' eager attention, which takes its softmax in float32 (hence 1e-6, not 1e-10)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=32, sliding_window=3,
                       attn_logit_softcapping=0.5, final_logit_softcapping=None)
    cfg._attn_implementation = "eager"
    m = Gemma2ForCausalLM(cfg).double()
    assert m.model.layers[0].self_attn.sliding_window == 3 and m.model.layers[0].self_attn.attn_logit_softcapping == 0.5
    with torch.no_grad():  # scores of order 1, so that the cap bites (at init they are ~1e-3 and tanh is linear)
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    _packed_vs_one_by_one(m, 1e-6)


def test_attention_sinks_match_transformers_gpt_oss():
    """GPT-OSS: a learned sink logit per head (and windowed layers), against its eager attention.
    float32: its expert matmul (grouped_mm) has no float64 kernel."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=32, sliding_window=3, num_local_experts=2,
                       num_experts_per_tok=1)
    cfg._attn_implementation = "eager"
    m = GptOssForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.sinks.normal_()  # initialised at zero: make them matter
    _packed_vs_one_by_one(m, 2e-5)
