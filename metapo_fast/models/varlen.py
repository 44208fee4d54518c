"""Padding-free packed sequences with a variable-length attention kernel.

``model.attn_implementation=varlen`` registers :data:`ATTN_NAME` with transformers'
``AttentionInterface`` and sets it on the model. :func:`metapo_fast.models.hf.last_hidden_states`
then packs the ``2B`` right-padded sequences of a batch into one row of ``sum(lengths)`` tokens
(:class:`PackPlan`), runs the decoder on that row with per-sequence ``position_ids`` and
``cu_seq_lens``, and scatters the hidden states back to the ``(2B, T, H)`` layout the fused loss
reads (a copy of ``H`` floats per token, against the ``V`` logits per token the fused loss never
materialises). No FLOP is spent on padding in the decoder.

The attention of a packed row (:func:`varlen_attention`):

* CUDA, fp16/bf16: ``flash_attn_varlen_func`` when flash-attn is installed, otherwise PyTorch's
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention);
* anywhere else (CPU, fp32/fp64): causal SDPA on each sequence in turn, which is also the
  reference the kernels are tested against.

The options transformers' models pass to their attention are honoured: a sliding window (Mistral,
Qwen2, Gemma 2, GPT-OSS), logit soft-capping (Gemma 2) and attention sinks (GPT-OSS).

No attention-mask function is registered for :data:`ATTN_NAME`: transformers then skips building
a mask (and its packed-sequence detection, a host sync). Called without ``cu_seq_lens_q`` (an
ordinary, unpacked forward such as ``generate``), the attention falls back to transformers' SDPA
with the causal mask only, which is exact for unpadded and right-padded inputs at every real token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ATTN_NAME", "PackPlan", "register", "is_varlen", "varlen_attention", "varlen_attention_reference"]

ATTN_NAME = "metapo_varlen"


@dataclass
class PackPlan:
    """Where each real token of a right-padded ``(N, T)`` batch goes in the packed row.

    Attributes:
        index: ``(L,)`` int64 flat positions ``row * T + t`` of the ``L`` real tokens, row-major.
        position_ids: ``(1, L)`` int64 position of each token inside its own sequence.
        cu_seqlens: ``(N + 1,)`` int32 cumulative lengths (FlashAttention's ``cu_seqlens``).
        max_seqlen: the longest sequence (a Python int, so kernels need no host sync).
        shape: ``(N, T)`` of the padded batch.
    """

    index: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    shape: tuple[int, int]
    bounds: tuple[int, ...] = ()  # cu_seqlens on the host

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, device: Optional[torch.device] = None) -> "PackPlan":
        """Plan of a right-padded ``(N, T)`` 0/1 mask. Built on the host from the CPU mask (a
        device mask is copied to the host first: pass the collator's CPU mask to avoid that sync).
        Raises ``ValueError`` naming the first row that is not right-padded."""
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: expected (N, T), got shape {tuple(attention_mask.shape)}")
        m = attention_mask.detach().to("cpu", torch.bool)
        n, t = m.shape
        lengths = m.sum(1)
        expected = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
        bad = (m != expected).any(1).nonzero()
        if bad.numel():
            r = int(bad[0, 0])
            raise ValueError(f"attention_mask row {r} is not right-padded (ones then zeros): packed varlen attention "
                             f"needs right padding, got {m[r].int().tolist()}")
        if n and int(lengths.min()) == 0:
            raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0, 0])} is empty: every sequence needs a token")
        index = expected.reshape(-1).nonzero().squeeze(1)
        row = torch.div(index, t, rounding_mode="floor")
        pos = index - row * t
        cu = torch.zeros(n + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0).to(torch.int32)
        plan = cls(index, pos.unsqueeze(0), cu, int(lengths.max()) if n else 0, (n, t), tuple(cu.tolist()))
        if device is None:
            return plan
        if torch.device(device).type == "cuda":  # pinned: the copies below are then truly asynchronous
            plan = PackPlan(plan.index.pin_memory(), plan.position_ids.pin_memory(),
                            plan.cu_seqlens.pin_memory(), plan.max_seqlen, plan.shape, plan.bounds)
        return plan.to(device)

    def to(self, device) -> "PackPlan":
        mv = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return PackPlan(mv(self.index), mv(self.position_ids), mv(self.cu_seqlens), self.max_seqlen, self.shape,
                        self.bounds)

    @property
    def row(self) -> torch.Tensor:
        """``(L,)`` sequence (row) of each packed token."""
        return torch.div(self.index, self.shape[1], rounding_mode="floor")

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, ...)`` -> ``(1, L, ...)``."""
        return x.reshape(self.shape[0] * self.shape[1], *x.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, L, ...)`` -> ``(N, T, ...)`` with zeros at padding (differentiable: a gather backward)."""
        n, t = self.shape
        out = x.new_zeros(n * t, *x.shape[2:]).index_copy(0, self.index, x[0])
        return out.view(n, t, *x.shape[2:])

    def decoder_kwargs(self) -> dict:
        """What the decoder's attention layers need (transformers' FlashAttentionKwargs names, plus
        the bounds as a host list for the per-sequence path, which then needs no device read)."""
        return dict(position_ids=self.position_ids, cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen, metapo_bounds=self.bounds)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], dropout_p: float,
            window: Optional[int], softcap: Optional[float], sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """One sequence, ``(H, n, D)`` each (heads already repeated): causal attention with the
    options of transformers' eager attention. A sliding window of ``w`` keeps keys ``q - w < k <= q``
    (transformers' ``sliding_window_overlay``); ``softcap`` caps scores as ``c * tanh(s / c)``
    (Gemma 2); ``sinks (H,)`` adds one learned logit per head to each softmax row and drops it
    after (GPT-OSS)."""
    if window is None and softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    n = q.shape[1]
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(n, device=q.device)
    allowed = i.unsqueeze(0) <= i.unsqueeze(1)
    if window is not None:
        allowed &= i.unsqueeze(0) > i.unsqueeze(1) - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, n, 1)], -1)
    low = scores.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(scores, -1, dtype=torch.float32 if low else scores.dtype).to(v.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return F.dropout(probs, dropout_p) @ v if dropout_p else probs @ v


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, scale: Optional[float] = None,
                               dropout_p: float = 0.0, window: Optional[int] = None, softcap: Optional[float] = None,
                               sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of each packed sequence on its own: ``q (L, Hq, D)``, ``k, v (L, Hkv, D)``
    (Hq a multiple of Hkv, grouped-query attention) -> ``(L, Hq, D)``. ``cu_seqlens``: a tensor
    or, to avoid reading a device tensor, a host sequence of the bounds. ``window``, ``softcap``
    and ``sinks`` as in :func:`_attend`."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    rep = hq // hkv
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(rep, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(rep, 0)
        outs.append(_attend(qs, ks, vs, scale, dropout_p, window, softcap, sinks).transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def torch_varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
                      scale: Optional[float], window_size: tuple) -> torch.Tensor:
    """PyTorch's ``varlen_attn`` (causal through ``window_size=(left, 0)``). Grouped-query attention
    goes to the kernel as ``enable_gqa`` where this torch has it (2.13); torch 2.11's
    ``varlen_attn`` has no such argument, so there the key/value heads are repeated first."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, window_size=window_size, enable_gqa=True)
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, window_size=window_size)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: Optional[float] = None, dropout_p: float = 0.0, bounds=None, window: Optional[int] = None,
                     softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention over packed sequences (shapes and options as
    :func:`varlen_attention_reference`; ``bounds``: ``cu_seqlens`` on the host, used by the
    per-sequence path). CUDA fp16/bf16 runs FlashAttention (flash-attn: windows and softcap;
    torch's varlen_attn: windows); sinks, and what the installed kernel lacks, take the
    per-sequence path."""
    if window is not None and window >= max_seqlen:
        window = None  # the window covers every sequence: plain causal attention
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and sinks is None:
        cu = cu_seqlens.to(torch.int32)
        left = -1 if window is None else window - 1  # FlashAttention counts the keys left of the query
        fa = _flash_attn_varlen()
        if fa is not None:
            return fa(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale, causal=True,
                      window_size=(left, 0) if window is not None else (-1, -1), softcap=softcap or 0.0)
        if dropout_p == 0.0 and softcap is None:
            return torch_varlen_attn(q, k, v, cu, max_seqlen, scale, (left, 0))
    return varlen_attention_reference(q, k, v, cu_seqlens if not bounds else bounds, scale=scale, dropout_p=dropout_p,
                                      window=window, softcap=softcap, sinks=sinks)


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       cu_seq_lens_q: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                       metapo_bounds=None, sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                       s_aux: Optional[torch.Tensor] = None, **kwargs):
    """transformers attention-interface signature: ``query (1, Hq, L, D)``, ``key/value (1, Hkv, L, D)``
    -> ``((1, L, Hq, D), None)``. Honours the options transformers' models pass to their attention:
    ``sliding_window`` (Mistral, Qwen2), ``softcap`` (Gemma 2) and ``s_aux`` sinks (GPT-OSS)."""
    if cu_seq_lens_q is None:  # an ordinary unpacked forward (generate, a user's call)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        extra = {k: v for k, v in (("sliding_window", sliding_window), ("softcap", softcap), ("s_aux", s_aux)) if v is not None}
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed varlen attention expects one packed row, got a batch of {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = varlen_attention(q, k, v, cu_seq_lens_q, int(max_length_q), scale=scaling, dropout_p=dropout, bounds=metapo_bounds,
                           window=None if sliding_window is None else int(sliding_window), softcap=softcap, sinks=s_aux)
    return out.unsqueeze(0), None


def register() -> str:
    """Register :data:`ATTN_NAME` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention_forward)
    return ATTN_NAME


def is_varlen(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) == ATTN_NAME
