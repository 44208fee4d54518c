"""Liger-Kernel modules swapped into one model instance (no global patching)."""
import copy

import pytest
import torch


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32))


def test_swap_replaces_modules_of_this_instance_only_and_copies_weights():
    from transformers.models.llama import modeling_llama

    from metapo_fast.models.liger import apply_liger_kernels

    cls_before = (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb)
    m = _tiny()
    ref = copy.deepcopy(m)
    counts = apply_liger_kernels(m)
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2, "rope": 2}
    assert "forward" in vars(m.model.layers[0].self_attn)  # an instance attribute: the class keeps its forward
    assert type(m.model.norm).__name__ == "LigerRMSNorm" and type(m.model.layers[1].mlp).__name__ == "LigerSwiGLUMLP"
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb) == cls_before
    other = _tiny()
    assert type(other.model.norm).__name__ == "LlamaRMSNorm" and "forward" not in vars(other.model.layers[0].self_attn)
    sd, sd_ref = m.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)


def test_cpu_run_with_liger_fails_clearly(tmp_path, capsys):
    from metapo_fast.train.cli import main

    with pytest.raises(ValueError, match="use_liger_kernels=true needs a CUDA device"):
        main([f"train.output_dir={tmp_path}", "model.use_liger_kernels=true", "train.max_steps=1"])


@pytest.mark.gpu
def test_liger_model_matches_original_on_gpu():
    from metapo_fast.models.liger import apply_liger_kernels

    m = _tiny().cuda()
    l = copy.deepcopy(m)
    apply_liger_kernels(l)
    ids = torch.randint(0, 50, (2, 9), device="cuda")
    torch.testing.assert_close(l(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_instance_rope_forward_equals_transformers_attention(attn):
    """The per-instance attention forward (used for Liger's RoPE), given transformers' own rotation,
    reproduces the stock model exactly (values and gradients), GQA included; a wrong rotation is caught."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from metapo_fast.models.liger import use_rope

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = attn
    m = LlamaForCausalLM(cfg).double()
    mine = copy.deepcopy(m)
    assert use_rope(mine, apply_rotary_pos_emb) == 2
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    a, b = m(ids, attention_mask=mask).logits, mine(ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(m.named_parameters(), mine.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)
    wrong = copy.deepcopy(m)
    use_rope(wrong, lambda q, k, cos, sin: apply_rotary_pos_emb(q, k, sin, cos))
    assert not torch.allclose(wrong(ids).logits, m(ids).logits)
