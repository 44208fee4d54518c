"""Ghost dot products: ``c_i = <G, g_i>`` for every pair i of a batch, where ``g_i = grad_theta l_i``
and ``G`` is a fixed direction in parameter space (the meta-gradient ``grad_theta L_meta``), without
ever forming a per-sample gradient (docs/math.md section 5).

Each token t belongs to exactly one pair, so one backward of ``sum_i l_i`` gives, at every layer,
the output gradient ``b_t = dl_i/dout_t`` of that pair alone. Then, per parameter kind:

* ``nn.Linear`` (y = x W^T + b):      ``<G_W, g_i> = sum_{t in i} b_t^T G_W a_t``  (+ ``b_t . G_b``)
* ``nn.Embedding`` (y = E[id]):        ``sum_{t in i} G_E[id_t] . b_t``
* elementwise-affine norms (y = w * xhat (+ beta)): ``sum_t (b_t * xhat_t) . G_w`` (+ ``b_t . G_beta``),
  xhat recomputed exactly by calling the norm with w = 1, beta = 0 on the captured input
* the LM head, which the fused loss owns: ``sum_t <coef_s(t) (onehot_t - softmax_t), G_W h_t + G_b>``

Only activations are needed, so attention kernels without double backward (FlashAttention, SDPA)
are fine. Parameters of any other kind are reported as not covered (:class:`GhostCoverageError`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.chunking import ChunkSchedule, compact_rows, host_label_mask
from ..ops.lce_epilogue import check_label_values, compute_dtype, lce_epilogue_backward_, lce_epilogue_forward

__all__ = ["GhostCoverageError", "GhostDots", "head_ghost_dots"]


class GhostCoverageError(RuntimeError):
    pass


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    own = dict(m.named_parameters(recurse=False))
    return (isinstance(w, nn.Parameter) and w.dim() == 1 and not isinstance(m, (nn.Linear, nn.Embedding))
            and set(own) <= {"weight", "bias"})


@torch.no_grad()
def _normalised(m: nn.Module, x: torch.Tensor, like_w: torch.Tensor, like_b: Optional[torch.Tensor]) -> torch.Tensor:
    """``xhat``: the norm's output with weight 1 and bias 0, computed exactly by its own forward.
    The parameters are swapped for constants shaped like the direction's (under ZeRO-3 the module's
    own are partitioned outside its forward) and ``forward`` is called directly, so no module hook
    (ZeRO's gather among them) runs."""
    swap = {"weight": torch.ones(like_w.shape, dtype=like_w.dtype, device=x.device)}
    if getattr(m, "bias", None) is not None:
        shape = like_b.shape if like_b is not None else like_w.shape
        swap["bias"] = torch.zeros(shape, dtype=like_w.dtype, device=x.device)
    saved = {k: m._parameters[k] for k in swap}
    try:
        for k, v in swap.items():
            m._parameters[k] = v
        return m.forward(x)
    finally:
        for k, v in saved.items():
            m._parameters[k] = v


class GhostDots:
    """Context manager: hooks on the model's modules accumulate ``c (B,)`` during one backward.

    Args:
        model: the policy (its LM head is excluded: see :func:`head_ghost_dots`).
        direction: ``{parameter: G}`` (full tensors) for the parameters to cover.
        token_pair: pair index of every token the hooked modules see: ``(N, T)`` for a padded
            batch, ``(1, L)`` for a packed varlen row (:class:`metapo_fast.models.varlen.PackPlan`).
        num_pairs: B.
        exclude: modules to skip (the LM head).
    """

    def __init__(self, model: nn.Module, direction: dict, token_pair: torch.Tensor, num_pairs: int,
                 exclude: tuple = ()):
        self.model, self.G, self.token_pair, self.B = model, direction, token_pair, num_pairs
        self.exclude = {id(m) for m in exclude}
        self.c = torch.zeros(num_pairs, dtype=torch.float64, device=token_pair.device)
        self._handles: list = []
        self.covered: set[int] = set()

    def __enter__(self):
        for m in self.model.modules():
            if id(m) in self.exclude:
                continue
            if isinstance(m, nn.Linear) and m.weight in self.G:
                self._hook(m, self._linear)
            elif isinstance(m, nn.Embedding) and m.weight in self.G:
                self._hook(m, self._embedding)
            elif _is_norm(m) and m.weight in self.G:
                self._hook(m, self._norm)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, fn: Callable) -> None:
        self.covered.update(id(p) for p in module.parameters(recurse=False))

        def fwd(mod, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()
            output.register_hook(lambda g: self._add(fn(mod, x, g.detach())))

        self._handles.append(module.register_forward_hook(fwd))

    def _add(self, per_token: torch.Tensor) -> None:
        """Scatter per-token contributions ``(N, T)`` into their pairs."""
        self.c.index_add_(0, self.token_pair.reshape(-1), per_token.reshape(-1).to(torch.float64))

    def _linear(self, m: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        G = self.G[m.weight].to(a.dtype)
        out = ((a @ G.t()) * b).sum(-1)
        if m.bias is not None and m.bias in self.G:
            out = out + b @ self.G[m.bias].to(b.dtype)
        return out

    def _embedding(self, m: nn.Embedding, ids: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.G[m.weight].to(b.dtype)[ids] * b).sum(-1)

    def _norm(self, m: nn.Module, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        xhat = _normalised(m, x, self.G[m.weight], self.G.get(getattr(m, "bias", None)))
        out = (b * xhat * self.G[m.weight].to(b.dtype)).sum(-1)
        if getattr(m, "bias", None) is not None and m.bias in self.G:
            out = out + b @ self.G[m.bias].to(b.dtype)
        return out

    def uncovered(self, params) -> list:
        return [p for p in params if id(p) not in self.covered]


@torch.no_grad()
def head_ghost_dots(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                    coef_seq: torch.Tensor, G_w: torch.Tensor, G_b: Optional[torch.Tensor], num_pairs: int,
                    ignore_index: int = -100, rows_per_chunk: int = 4096, backend: str = "auto",
                    compact: Optional[bool] = None, host_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LM-head part of ``c_i``: ``sum_{t in i} <coef_s(t) (onehot_t - softmax_t), G_W h_t + G_b>``.

    ``hidden (2B, T, H)``, ``labels (2B, T)``, ``coef_seq (2B,)`` = ``dl_i / dlogp_s`` of each
    sequence. Two GEMMs of the size of the logits per chunk (``h W^T`` and ``h G_W^T``), over the
    fused loss's chunk schedule (:mod:`metapo_fast.ops.chunking`: unlabelled rows dropped on CPU,
    kept with a zero coefficient on CUDA, so no host sync; ``compact`` forces either rule).
    ``host_labels``: the CPU copy of ``labels`` (the collated batch before its copy to the GPU), as
    the fused loss takes it: on CUDA the unlabelled rows are then dropped too, with the row indices
    computed on the host (no sync), so the two GEMMs cost 4 N_loss H V instead of 4 N H V.

    The rows' hidden states, targets, coefficients and pairs are gathered once for all chunks
    (``N x H``, hidden-sized); a chunk is then six ops: two GEMMs, the epilogue's forward and
    backward, one product and one row sum into its slice of the per-row dots, which one
    ``index_add`` sums into the pairs at the end.
    """
    n2, t, h = hidden.shape
    flat_h, flat_l = hidden.reshape(-1, h), labels.reshape(-1)
    mask = flat_l != ignore_index
    compact = compact_rows(hidden.device) if compact is None else compact
    host_mask = host_label_mask(labels, host_labels, ignore_index)
    schedule = ChunkSchedule(mask, n2, t, rows_per_chunk, compact=compact, host_mask=host_mask)
    rows, seq = schedule.token_rows()
    cd = compute_dtype(hidden.dtype)
    x_all = flat_h.index_select(0, rows)
    tgt_all = torch.where(mask, flat_l, 0).index_select(0, rows)
    if tgt_all.device.type == "cpu":  # once for every chunk (the C++ epilogue indexes with them)
        check_label_values(tgt_all, weight.shape[0], ignore_index)
    coef_all = coef_seq.to(cd).index_select(0, seq) * mask.index_select(0, rows).to(cd)  # 0 on unlabelled rows
    dots = torch.empty(rows.numel(), dtype=torch.float64, device=hidden.device)  # per row
    G_w = G_w.to(x_all.dtype)
    G_b = None if G_b is None else G_b.to(x_all.dtype)
    for x, tgt, cf, out in zip(*(a.split(schedule.rows_per_chunk) for a in (x_all, tgt_all, coef_all, dots))):
        logits = F.linear(x, weight, bias)
        lse = lce_epilogue_forward(logits, tgt, backend=backend, validate=False)[0]
        lce_epilogue_backward_(logits, lse, tgt, cf, backend=backend, validate=False)  # logits <- dl/dlogits
        # in place into the chunk's own logits buffer, summed in float64: no [rows, V] float64 copies
        torch.sum(logits.mul_(F.linear(x, G_w, G_b)), -1, dtype=torch.float64, out=out)
    return torch.zeros(num_pairs, dtype=torch.float64, device=hidden.device).index_add_(0, seq % num_pairs, dots)
