"""Liger-Kernel's fused RMSNorm, SwiGLU and RoPE for a model *instance*, enabled explicitly by
``model.use_liger_kernels``. Liger's own ``apply_liger_kernel_to_*`` also rebinds names inside
transformers' modeling modules (a global patch that changes every model of that class in the
process); this swaps only this model's modules, copying their weights.

RoPE: transformers applies it through the module-level ``apply_rotary_pos_emb`` that Liger would
rebind. Here each ``LlamaAttention`` instance gets its own forward (:func:`_llama_attention_forward`,
transformers' Llama attention with the rotation passed in), so other models keep theirs. Other
attention classes (Mistral's and Qwen's pass extra arguments, e.g. a sliding window) keep
transformers' RoPE; the returned counts say what was swapped. The kernels are Triton (CUDA).
"""
from __future__ import annotations

import sys
import types
from typing import Callable

from torch import nn

__all__ = ["apply_liger_kernels", "use_rope"]


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight") and hasattr(m, "variance_epsilon")


def _is_swiglu(m: nn.Module, config) -> bool:
    act = getattr(config, "hidden_act", None)
    return all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")) and act in ("silu", "swish")


def _llama_attention_forward(rope: Callable):
    """transformers' ``LlamaAttention.forward`` (v5) with ``rope(q, k, cos, sin)`` for the rotation."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = rope(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        eager = sys.modules[type(self).__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    return forward


def use_rope(model: nn.Module, rope: Callable) -> int:
    """Give every ``LlamaAttention`` of ``model`` a forward that rotates with ``rope``; returns how many."""
    n = 0
    for mod in model.modules():
        if type(mod).__name__ == "LlamaAttention" and all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            mod.forward = types.MethodType(_llama_attention_forward(rope), mod)
            n += 1
    return n


def apply_liger_kernels(model: nn.Module) -> dict[str, int]:
    """Replace the RMSNorm and SwiGLU-MLP modules of ``model`` by Liger's and give its Llama
    attention layers Liger's RoPE; returns counts."""
    from ..extras import require

    require("liger_kernel")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    counts = {"rms_norm": 0, "swiglu": 0}
    for name, mod in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _is_rmsnorm(mod):
            new = LigerRMSNorm(mod.weight.shape[0], eps=mod.variance_epsilon, in_place=False)
            counts["rms_norm"] += 1
        elif _is_swiglu(mod, model.config):
            new = LigerSwiGLUMLP(model.config)
            counts["swiglu"] += 1
        else:
            continue
        new.load_state_dict(mod.state_dict())
        setattr(parent, child, new.to(device=next(mod.parameters()).device, dtype=next(mod.parameters()).dtype))
    counts["rope"] = use_rope(model, liger_rotary_pos_emb)
    return counts
