"""Thin adapters around Hugging Face causal LMs: the decoder's last hidden states and the LM head,
so the fused loss replaces the head (the model's forward never returns logits in training)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["decoder_of", "lm_head_of", "last_hidden_states", "pack_plan", "compute_device"]


def decoder_of(model: nn.Module) -> nn.Module:
    """The body of a ``*ForCausalLM`` (everything but the LM head), e.g. ``LlamaForCausalLM.model``."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None:
            return dec
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and hasattr(model, prefix):
        return getattr(model, prefix)
    raise ValueError(f"cannot find the decoder of {type(model).__name__}: expected get_decoder() or base_model_prefix")


def lm_head_of(model: nn.Module) -> nn.Linear:
    """The output projection ``(V, H)`` (+ optional bias) of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) to fuse the loss with")
    return head


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its parameters' device, or the device a host-resident model is
    streamed to (:func:`metapo_fast.models.offload.stream_reference`)."""
    dev = getattr(model, "_metapo_compute_device", None)
    return dev if dev is not None else next(model.parameters()).device


def pack_plan(model: nn.Module, attention_mask: Optional[torch.Tensor], device=None):
    """The :class:`~metapo_fast.models.varlen.PackPlan` of a batch when ``model`` runs packed varlen
    attention (``model.attn_implementation=varlen``), else ``None``. Pass the collator's CPU
    mask: the plan is built on the host and copied to ``device`` without a sync."""
    from .varlen import PackPlan, is_varlen

    if attention_mask is None or not is_varlen(model):
        return None
    return PackPlan.from_mask(attention_mask, device if device is not None else next(model.parameters()).device)


def last_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, plan=None, **kwargs
) -> torch.Tensor:
    """``(N, T, H)`` hidden states that the LM head would read (final norm applied).

    With packed varlen attention the ``N`` right-padded rows run as one packed row (``plan``, or
    one built from ``attention_mask``) and come back in the padded layout, zeros at padding."""
    dec = decoder_of(model)
    if plan is None:
        plan = pack_plan(model, attention_mask, input_ids.device)
    if plan is not None:
        out = dec(input_ids=plan.pack(input_ids), attention_mask=None, use_cache=False, **plan.decoder_kwargs(), **kwargs)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return plan.unpack(h)
    out = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def reference_hidden_states(ref: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            device: torch.device, plan=None, host_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The frozen reference's last hidden states, on ``device``. The reference computes where it
    lives (:func:`compute_device`: its device, or the one a host-resident reference streams to).
    ``plan`` is the policy's pack plan (the reference runs the same attention); without it one is
    built from ``host_mask`` (the collator's CPU mask: no sync) when the reference runs varlen."""
    rdev = compute_device(ref)
    if plan is None:
        plan = pack_plan(ref, host_mask if host_mask is not None else attention_mask, rdev)
    elif plan.cu_seqlens.device != rdev:
        plan = plan.to(rdev)
    return last_hidden_states(ref, input_ids.to(rdev), None if attention_mask is None else attention_mask.to(rdev),
                              plan=plan).to(device)


def reference_head_inputs(ref: Optional[nn.Module], ref_hidden: Optional[torch.Tensor], device: torch.device) -> dict:
    """The fused loss's reference arguments (``ref_hidden``, ``ref_weight``, ``ref_bias``) on
    ``device``; ``{}`` without a reference. The head is read directly (under ZeRO-3, call inside
    the context that gathers it)."""
    if ref is None or ref_hidden is None:
        return {}
    head = lm_head_of(ref)
    return dict(ref_hidden=ref_hidden, ref_weight=head.weight.to(device, non_blocking=True),
                ref_bias=None if head.bias is None else head.bias.to(device, non_blocking=True))
