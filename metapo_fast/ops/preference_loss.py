"""Fused linear preference loss: LM head + log-probs + token KL + weighted pairwise loss + its
gradient, chunk by chunk, never materialising the full ``[2B*T, V]`` logits.

Per chunk the policy logits ``h W^T (+b)`` and reference logits are produced by torch.matmul
(cuBLAS / MKL); one fused epilogue reads both once for log-sum-exp, the target log-prob and the
full-vocabulary KL; the per-pair loss of the chunk's pairs gives one coefficient per sequence,
``c_s = dL/dlogp_s``; the backward epilogue overwrites the policy logits with
``c_s (onehot - softmax)``; two more GEMMs give ``grad_h`` and ``grad_W``. Gradients are computed
in the forward (as Liger-Kernel does) and scaled by the incoming gradient in backward, so the
policy logits are computed once: the 8NHV FLOP floor (README, "How the fused loss works").

Chunks hold whole pairs while a pair's rows fit the memory budget. When one pair does not fit
(e.g. T=8192 at V=128k), the pair is streamed: its rows come in blocks, and the gradients of both
sequences are kept in two V x H fp32 accumulators until the pair's coefficients are known, so the
policy logits are still computed once (8NHV; no path recomputes them). MetaPO's weights, known
only from this pass's margins, come from a per-chunk callback (``weights_fn``). The schedule
(which rows, how many per chunk; prompt and padding rows dropped on CPU, and on CUDA when the
host's copy of the labels is given, else kept with a zero coefficient) is :mod:`.chunking`'s.

Reading order: the output type, input checks, the chunked computation, the custom op (fake and
autograd), then the public function, ``fused_sequence_logps`` and the ``nn.Module``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .chunking import DEFAULT_CHUNK_BYTES, ChunkSchedule, compact_rows, host_label_mask, pair_rows_on_device
from .dispatch import BACKENDS
from ..losses import LossParams, PairBatch, get_loss, sequence_coefficients
from .lce_epilogue import check_label_values, compute_dtype, lce_epilogue_backward_, lce_epilogue_forward

__all__ = ["PreferenceLossOutput", "fused_linear_preference_loss", "fused_sequence_logps", "FusedLinearPreferenceLoss",
           "DEFAULT_CHUNK_BYTES"]

# Dispatch-key TLS of ordinary eager code, captured at import (see _Chunker._coefficients).
_DEFAULT_DISPATCH_TLS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@dataclass
class PreferenceLossOutput:
    """Result of :func:`fused_linear_preference_loss`. Per-pair fields have shape ``(B,)`` and are
    detached; ``loss`` is the scalar weighted loss ``(1/B) sum_i w_i l_i`` and carries the gradient.

    Log-probs are sums over response tokens (TRL's ``logps/chosen``); ``*_avg_logps`` divide by the
    token count. ``margins`` is the loss's logit z (math.md sections 1-2); ``kl`` is the mean
    full-vocabulary token KL to the reference over both responses' tokens (None without reference
    hidden states or with ``compute_kl=False``).
    """

    loss: torch.Tensor
    per_pair_loss: torch.Tensor
    margins: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor]
    ref_rejected_logps: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    beta: float
    sample_weights: Optional[torch.Tensor] = None  # the weights used (given, or from weights_fn)

    @property
    def chosen_avg_logps(self) -> torch.Tensor:
        return self.chosen_logps / self.chosen_counts.clamp(min=1)

    @property
    def rejected_avg_logps(self) -> torch.Tensor:
        return self.rejected_logps / self.rejected_counts.clamp(min=1)

    @property
    def chosen_rewards(self) -> Optional[torch.Tensor]:
        """``beta * lr(y_w)`` (TRL's ``rewards/chosen``); None without reference."""
        return None if self.ref_chosen_logps is None else self.beta * (self.chosen_logps - self.ref_chosen_logps)

    @property
    def rejected_rewards(self) -> Optional[torch.Tensor]:
        return None if self.ref_rejected_logps is None else self.beta * (self.rejected_logps - self.ref_rejected_logps)

    @property
    def accuracies(self) -> torch.Tensor:
        """1.0 where the pair is ranked correctly (z > 0) (TRL's ``rewards/accuracies``)."""
        return (self.margins > 0).float()


# ---------------------------------------------------------------------------------------------
# Input validation: one place, clear messages naming the argument and the shapes.
# ---------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights, ignore_index):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a (2B, T, H) tensor, got {_shape(hidden)}")
    n2, t, h = hidden.shape
    if n2 == 0 or n2 % 2:
        raise ValueError(f"hidden must have an even, non-zero number of rows (B chosen then B rejected), got {n2} rows")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got dtype {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be (V, H) with H={h} to match hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    v = weight.shape[0]
    if labels.shape != (n2, t):
        raise ValueError(f"labels must have shape {(n2, t)} to match hidden {tuple(hidden.shape)}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    dev = hidden.device
    named = {"weight": weight, "labels": labels, "bias": bias, "ref_hidden": ref_hidden, "ref_weight": ref_weight,
             "ref_bias": ref_bias, "ref_logps": ref_logps, "sample_weights": sample_weights}
    for name, x in named.items():
        if x is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device} but hidden is on {dev}; all inputs must share one device")
    if bias is not None and (bias.shape != (v,) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be ({v},) of dtype {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    # The label values are checked by the op's body (_Chunker), on CPU only (on CUDA it would cost a host
    # sync): there it also runs when a torch.compile'd graph calls the op.
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden was given without ref_weight")
        if ref_hidden.shape[:2] != (n2, t):
            raise ValueError(f"ref_hidden must have shape ({n2}, {t}, H_ref) to match hidden, got {tuple(ref_hidden.shape)}")
        if ref_weight.dim() != 2 or ref_weight.shape != (v, ref_hidden.shape[2]):
            raise ValueError(f"ref_weight must be ({v}, {ref_hidden.shape[2]}) to match weight and ref_hidden, got {tuple(ref_weight.shape)}")
        if ref_weight.dtype != ref_hidden.dtype:
            raise ValueError(f"ref_weight dtype {ref_weight.dtype} differs from ref_hidden dtype {ref_hidden.dtype}")
        if ref_bias is not None and ref_bias.shape != (v,):
            raise ValueError(f"ref_bias must be ({v},), got {tuple(ref_bias.shape)}")
        if ref_logps is not None:
            raise ValueError("give either ref_hidden/ref_weight or ref_logps, not both")
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight/ref_bias were given without ref_hidden")
    if ref_logps is not None and ref_logps.shape != (n2,):
        raise ValueError(f"ref_logps must hold {n2} sequence log-probs (chosen then rejected), got {tuple(ref_logps.shape)}")
    if sample_weights is not None and sample_weights.shape != (n2 // 2,):
        raise ValueError(f"sample_weights must have shape ({n2 // 2},) (one per pair), got {tuple(sample_weights.shape)}")


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


# ---------------------------------------------------------------------------------------------
# The chunked computation (runs inside the custom op, below autograd).
# ---------------------------------------------------------------------------------------------
class _LazyPairStats(PreferenceLossOutput):
    """The statistics of one group's pairs that a weights callback sees (detached, shape (n,)):
    each field is computed when the callback first reads it (a callback of the margins alone
    costs no other op)."""

    def __init__(self, chunker: "_Chunker", g: int, z: Optional[torch.Tensor]):
        object.__setattr__(self, "_src", (chunker, g, z))
        self.loss, self.beta = None, chunker.params.beta

    def __getattr__(self, name):
        if name.startswith("__") or name == "_src":
            raise AttributeError(name)
        c, g, z = self._src
        values = c._group_fields(g)
        if name in ("per_pair_loss", "margins"):
            per_pair, logit = c.spec.fn(c._group_batch(g), c.params)
            values["per_pair_loss"], values["margins"] = per_pair, (logit if z is None else z)
        if name not in values:
            raise AttributeError(name)
        setattr(self, name, values[name])
        return values[name]

    def __repr__(self):
        return f"_LazyPairStats(group={self._src[1]})"


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _Chunker:
    """The fused loss's loop over :class:`~.chunking.PairLayout`. Per-sequence statistics live in
    ``S (2B, K)`` in layout order (columns: log-prob, reference log-prob if computed, KL if
    computed, token count); a group's rows of ``S`` are one GEMM with its row-to-sequence matrix
    ``P_g`` (mask included). The per-pair loss, logit and the batch loss are computed once at the
    end from ``S``; per group only the coefficients ``c_s = dL/dlogp_s`` are (closed forms of
    :mod:`metapo_fast.losses`, autograd for a loss without one)."""

    def __init__(self, hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_seq, sample_weights,
                 spec, params, ignore_index, compute_kl, chunk_bytes, backend, compute_grad, host_mask=None,
                 weights_fn=None):
        self.b2, self.t, self.h = hidden.shape
        self.bsz = self.b2 // 2
        self.v = weight.shape[0]
        self.hidden = hidden.reshape(-1, self.h)
        self.ref_hidden = None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1])
        self.weight, self.bias, self.ref_weight, self.ref_bias = weight, bias, ref_weight, ref_bias
        self.labels = labels.reshape(-1)
        labels_np = self.labels.numpy() if labels.device.type == "cpu" else None  # host data: read in NumPy
        if labels_np is not None:  # the C++ epilogue indexes with them
            check_label_values(labels, self.v, ignore_index, host=labels_np.reshape(labels.shape))
        self.spec, self.params, self.backend = spec, params, backend
        self.has_ref_logits = ref_hidden is not None
        self.compute_kl = compute_kl and self.has_ref_logits
        self.weights, self.weights_fn = sample_weights, weights_fn
        self.compute_grad = compute_grad
        self.cd = cd = compute_dtype(hidden.dtype)
        dev = hidden.device
        self.K = 2 + self.has_ref_logits + self.compute_kl  # logp, [ref], [kl], count
        self.pair_weights = torch.ones(self.bsz, dtype=cd, device=dev) if weights_fn is not None else None
        if compute_grad:
            self.grad_hidden = torch.zeros_like(self.hidden)
            self.grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if cd == torch.float32 else cd, device=dev)
            self.grad_bias = None if bias is None else torch.zeros(self.v, dtype=self.grad_weight.dtype, device=dev)
        rows = ChunkSchedule.rows_for(chunk_bytes, self.v, hidden.element_size(), self.has_ref_logits)
        rows = pair_rows_on_device(rows, self.t, self.v, hidden.element_size(), self.has_ref_logits, dev)
        compact = compact_rows(dev)
        if labels_np is not None and (compact or host_mask is not None):  # CPU labels: their own mask, on the host
            host_mask = torch.from_numpy(labels_np != ignore_index)  # (a CPU host_labels copy is not needed, not trusted)
        # exact: the rule's mask is on the host, so every scheduled row carries a label (no device mask)
        self.exact = host_mask is not None
        mask = None if self.exact else self.labels != ignore_index
        self.schedule = ChunkSchedule(mask, self.b2, self.t, rows, compact=compact, host_mask=host_mask, device=dev)
        self.streamed = not self.schedule.pairs_fit
        lay = self.layout = self.schedule.layout(self.streamed)
        # every block's rows, targets and mask, and every group's P_g, split once
        sizes = [n for bl in lay.blocks for n, _ in bl]
        if self.exact:  # the targets are the labels, the mask all ones
            tgt_all, m_all = self.labels.index_select(0, lay.rows), torch.ones(lay.rows.numel(), dtype=cd, device=dev)
        else:
            m_all = mask.to(cd).index_select(0, lay.rows)
            tgt_all = torch.where(mask, self.labels, 0).index_select(0, lay.rows)
        self.blk_rows, self.blk_tgt, self.blk_m = (x.split(sizes) for x in (lay.rows, tgt_all, m_all))
        buf = torch.empty(lay.rows.numel(), self.K, dtype=cd, device=dev)  # per-row statistics
        self.blk_buf, self.grp_buf = buf.split(sizes), buf.split(lay.group_rows)
        width = 2 * (lay.groups[0][1] - lay.groups[0][0])
        if self.exact:  # built on the host: one queued copy on CUDA
            P_host = np.zeros((len(lay.rows_host), width), dtype=_NP_DTYPES[cd])
            P_host[np.arange(len(lay.rows_host)), lay.col_host] = 1
            P = self.schedule.to_device(torch.from_numpy(P_host))
        else:
            P = torch.zeros(lay.rows.numel(), width, dtype=cd, device=dev).scatter_(1, lay.col.unsqueeze(1), m_all.unsqueeze(1))
        self.grp_PT = list(P.t().split(lay.group_rows, dim=1))
        self.grp_P = P.split(lay.group_rows) if not self.streamed else None
        n_list = [i1 - i0 for i0, i1 in lay.groups]
        if 2 * n_list[-1] != width:
            self.grp_PT[-1] = self.grp_PT[-1][: 2 * n_list[-1]]
            if self.grp_P is not None:
                self.grp_P = (*self.grp_P[:-1], self.grp_P[-1][:, : 2 * n_list[-1]])
        self.S = torch.zeros(self.b2, self.K, dtype=cd, device=dev)
        self.grp_S = self.S.split([2 * n for n in n_list])
        self.ref_given = None if ref_seq is None else ref_seq.to(cd)
        self.grp_ref = None if ref_seq is None else self.ref_given.index_select(0, lay.order).split([2 * n for n in n_list])
        self.grp_w = None if sample_weights is None else sample_weights.to(cd).split(n_list)
        self.grp_pairs = torch.arange(self.bsz, device=dev).split(n_list) if weights_fn is not None else None
        self.coef_seq = torch.zeros(self.b2, dtype=cd, device=dev) if (self.streamed and compute_grad) else None
        self.grp_coef = None if self.coef_seq is None else self.coef_seq.split([2 * n for n in n_list])
        self._consts: dict = {}

    # -- constants of the DPO-margin losses: z = Dz @ lr, c = Dc @ dl/dz (per group size n) ------
    def _margin_consts(self, n: int):
        c = self._consts.get(n)
        if c is None:  # built on the host: one small tensor each
            beta, inv_b = self.params.beta, 1.0 / self.bsz
            dz = [[beta if k == j else (-beta if k == n + j else 0.0) for k in range(2 * n)] for j in range(n)]
            dc = [[dz[j][k] * inv_b for j in range(n)] for k in range(2 * n)]
            a = [1.0, -1.0 if self.has_ref_logits else 0.0] + [0.0] * (self.K - 2)
            c = self._consts[n] = tuple(self.schedule.to_device(torch.from_numpy(np.asarray(x, dtype=_NP_DTYPES[self.cd])))
                                        for x in (dz, dc, a))
        return c

    # -- the statistics of a group, as the losses see them -----------------------------------------
    def _group_batch(self, g: int) -> PairBatch:
        n, Sg = self._n(g), self.grp_S[g]
        ref = Sg[:, 1] if self.has_ref_logits else (None if self.grp_ref is None else self.grp_ref[g])
        return PairBatch(Sg[:n, 0], Sg[n:, 0], Sg[:n, -1], Sg[n:, -1],
                         None if ref is None else ref[:n], None if ref is None else ref[n:])

    def _group_fields(self, g: int) -> dict:
        b = self._group_batch(g)
        kl = None
        if self.compute_kl:
            n, Sg = self._n(g), self.grp_S[g]
            kl = (Sg[:n, 2] + Sg[n:, 2]) / (Sg[:n, -1] + Sg[n:, -1]).clamp(min=1)
        return dict(chosen_logps=b.chosen_logps, rejected_logps=b.rejected_logps, chosen_counts=b.chosen_counts,
                    rejected_counts=b.rejected_counts, ref_chosen_logps=b.ref_chosen_logps,
                    ref_rejected_logps=b.ref_rejected_logps, kl=kl)

    def _n(self, g: int) -> int:
        i0, i1 = self.layout.groups[g]
        return i1 - i0

    def _coefficients(self, g: int, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``c_s = dL/dlogp_s`` for group g's sequences (layout order, ``(2n,)``), from its row of
        ``S``: ``L = sum_i w_i l_i / B`` with w detached, so ``c_s = w_i dl_i/dlogp_s / B``. The
        weights are ``sample_weights``, or ``weights_fn`` of these pairs' statistics."""
        n, Sg, spec = self._n(g), self.grp_S[g], self.spec
        z = None
        if spec.logit_grad is not None:  # l(z) of the DPO margin: a few ops
            dz, dc, a = self._margin_consts(n)
            lr = Sg @ a if self.has_ref_logits else Sg[:, 0] - self.grp_ref[g]
            z = dz @ lr
        w = None
        if self.weights_fn is not None:
            with torch._C._ForceDispatchKeyGuard(*_DEFAULT_DISPATCH_TLS):
                w = self.weights_fn(self.grp_pairs[g], _LazyPairStats(self, g, z))
            if w.requires_grad:
                w = w.detach()
            if w.dtype != self.cd or w.dim() != 1:
                w = w.to(self.cd).reshape(-1)
            self.pair_weights[self.layout.groups[g][0]:self.layout.groups[g][1]] = w
        elif self.grp_w is not None:
            w = self.grp_w[g]
        if not self.compute_grad:
            return None
        if z is not None:
            d = spec.logit_grad(z, self.params)
            return torch.mv(dc, d if w is None else d * w, out=out)
        if spec.grad is not None:
            d_w, d_l = spec.grad(self._group_batch(g), self.params)
            coef = torch.cat([d_w, d_l])
            return (coef if w is None else coef * w.repeat(2)) / self.bsz
        b = self._group_batch(g)
        ref = None if b.ref_chosen_logps is None else torch.cat([b.ref_chosen_logps, b.ref_rejected_logps])
        # A custom op's body runs with autograd (and torch.func, under torch.compile) excluded from
        # dispatch; the autograd fallback runs with the default dispatch TLS.
        with torch._C._ForceDispatchKeyGuard(*_DEFAULT_DISPATCH_TLS):
            return sequence_coefficients(spec, self.params, Sg[:, 0], Sg[:, -1], ref, w, denom=self.bsz)[3]

    # -- the loop -----------------------------------------------------------------------------------
    def _forward_block(self, b: int):
        """One block's logits and epilogue; its per-row statistics go to the row buffer."""
        rows = self.blk_rows[b]
        h = self.hidden.index_select(0, rows)
        logits = F.linear(h, self.weight, self.bias)
        ref_logits = None
        if self.has_ref_logits:
            ref_logits = F.linear(self.ref_hidden.index_select(0, rows), self.ref_weight, self.ref_bias)
        lse, logp, ref_logp, kl = lce_epilogue_forward(logits, self.blk_tgt[b], ref_logits, backend=self.backend,
                                                       validate=False)
        del ref_logits
        xs = [logp] + ([ref_logp] if self.has_ref_logits else []) + ([kl] if self.compute_kl else []) + [self.blk_m[b]]
        torch.stack(xs, dim=1, out=self.blk_buf[b])
        return logits, lse, h

    def _backward_block(self, b, logits, lse, h, coef_rows, gw, gb):
        lce_epilogue_backward_(logits, lse, self.blk_tgt[b], coef_rows, backend=self.backend, validate=False)
        self.grad_hidden.index_copy_(0, self.blk_rows[b], torch.mm(logits, self.weight))
        _add_mm_(gw, logits.t(), h)
        if gb is not None:
            gb.add_(logits.sum(0, dtype=gb.dtype))

    def run(self):
        b = 0
        if self.streamed and self.compute_grad:
            acc = torch.zeros((2, *self.grad_weight.shape), dtype=self.grad_weight.dtype, device=self.S.device)
            acc_b = None if self.grad_bias is None else torch.zeros(2, self.v, dtype=self.grad_bias.dtype, device=self.S.device)
            gw_flat, acc_t, acc_w = self.grad_weight.view(-1), acc.view(2, -1).t(), acc.unbind(0)
            acc_bs = None if acc_b is None else acc_b.unbind(0)
        for g, blocks in enumerate(self.layout.blocks):
            kept = None
            for _, side in blocks:
                logits, lse, h = self._forward_block(b)
                if self.streamed and self.compute_grad:  # coefficient 1 now, c_s applied when the pair is done
                    self._backward_block(b, logits, lse, h, self.blk_m[b], acc_w[side], None if acc_b is None else acc_bs[side])
                elif self.compute_grad:
                    kept = (b, logits, lse, h)
                del logits
                b += 1
            torch.mm(self.grp_PT[g], self.grp_buf[g], out=self.grp_S[g])
            coef = self._coefficients(g, None if self.coef_seq is None else self.grp_coef[g])
            if coef is None:
                continue
            if not self.streamed:
                if kept is not None:
                    self._backward_block(*kept, torch.mv(self.grp_P[g], coef), self.grad_weight, self.grad_bias)
                kept = None
                continue
            # streamed pair: grad_W += c_w A_w + c_l A_l; grad_h rows scaled by c_s at the end
            if coef is not self.grp_coef[g]:
                self.grp_coef[g].copy_(coef)
            gw_flat.addmv_(acc_t, coef)
            acc.zero_()
            if acc_b is not None:
                self.grad_bias.addmv_(acc_b.t(), coef)
                acc_b.zero_()
        return self._finish()

    def _finish(self):
        lay = self.layout
        cols = [self.S[:, j].index_select(0, lay.pos) for j in range(self.K)]  # sequence order, own storage each
        self.seq_logps, self.counts = cols[0], cols[-1]
        self.ref_seq = cols[1] if self.has_ref_logits else self.ref_given
        self.kl_sum = cols[2] if self.compute_kl else None
        if self.streamed and self.compute_grad:
            self.grad_hidden.view(self.b2, -1).mul_(self.coef_seq.index_select(0, lay.pos).unsqueeze(1).to(self.grad_hidden.dtype))
        bsz, ref = self.bsz, self.ref_seq
        batch = PairBatch(self.seq_logps[:bsz], self.seq_logps[bsz:], self.counts[:bsz], self.counts[bsz:],
                          None if ref is None else ref[:bsz], None if ref is None else ref[bsz:])
        per_pair, logit = self.spec.fn(batch, self.params)
        w = self.pair_weights if self.pair_weights is not None else (None if self.weights is None else self.weights.to(self.cd))
        self.per_pair, self.logit = per_pair, logit
        self.loss = (per_pair if w is None else w * per_pair).sum() / bsz
        return self


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` without a temporary of out's size when the dtypes allow: in place for equal
    dtypes; on CUDA bf16/fp16 operands accumulate into the fp32 ``out`` through ``out_dtype``."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
        return
    if out.is_cuda:
        try:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            return
        except (RuntimeError, TypeError):
            pass
    out.add_(a @ b)


# ---------------------------------------------------------------------------------------------
# torch.library custom op (opaque to torch.compile) with a fake implementation and autograd.
# ---------------------------------------------------------------------------------------------
_EMPTY = (0,)


def _run(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights, loss_type, beta,
         label_smoothing, focal_gamma, simpo_gamma, orpo_lambda, ignore_index, compute_kl, chunk_bytes, backend,
         compute_grad, host_mask=None, weights_fn=None):
    """The op's computation: its ten outputs, and the chunker (for the weights a callback gave)."""
    params = LossParams(beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda)
    c = _Chunker(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights,
                 get_loss(loss_type), params, ignore_index, compute_kl, chunk_bytes, backend, compute_grad,
                 host_mask=host_mask, weights_fn=weights_fn).run()

    def empty():  # one fresh tensor per absent output: outputs may not alias each other
        return hidden.new_empty(_EMPTY, dtype=c.cd)

    ref = c.ref_seq if c.ref_seq is not None else empty()
    kl = c.kl_sum if c.kl_sum is not None else empty()
    if compute_grad:
        gh = c.grad_hidden.view_as(hidden)
        gw = c.grad_weight
        gb = c.grad_bias if c.grad_bias is not None else empty()
    else:
        gh, gw, gb = empty(), empty(), empty()
    # ref_logps (an input) must not be returned as an output alias
    return (c.loss, c.per_pair, c.logit, c.seq_logps, c.counts, ref.clone() if ref is ref_logps else ref, kl, gh, gw, gb), c


@torch.library.custom_op("metapo_fast::fused_linear_preference_loss", mutates_args=())
def _fused_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor], sample_weights: Optional[torch.Tensor],
    loss_type: str, beta: float, label_smoothing: float, focal_gamma: float, simpo_gamma: float, orpo_lambda: float,
    ignore_index: int, compute_kl: bool, chunk_bytes: int, backend: str, compute_grad: bool,
    host_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights, loss_type,
                beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda, ignore_index, compute_kl, chunk_bytes,
                backend, compute_grad, host_mask)[0]


@_fused_op.register_fake
def _fused_op_fake(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights,
                   loss_type, beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda, ignore_index,
                   compute_kl, chunk_bytes, backend, compute_grad, host_mask=None):
    cd = compute_dtype(hidden.dtype)
    b2 = hidden.shape[0]
    new = lambda *s, dtype=cd: hidden.new_empty(s, dtype=dtype)  # noqa: E731
    has_ref = ref_hidden is not None or ref_logps is not None
    ref = new(b2) if has_ref else new(0)
    kl = new(b2) if (compute_kl and ref_hidden is not None) else new(0)
    if compute_grad:
        gw_dtype = torch.float32 if cd == torch.float32 else cd
        gh, gw = new(*hidden.shape, dtype=hidden.dtype), new(*weight.shape, dtype=gw_dtype)
        gb = new(weight.shape[0], dtype=gw_dtype) if bias is not None else new(0)
    else:
        gh, gw, gb = new(0), new(0), new(0)
    return new(), new(b2 // 2), new(b2 // 2), new(b2), new(b2), ref, kl, gh, gw, gb


_OP_INPUTS = ("hidden", "weight", "labels", "bias", "ref_hidden", "ref_weight", "ref_bias", "ref_logps",
              "sample_weights", "loss_type", "beta", "label_smoothing", "focal_gamma", "simpo_gamma", "orpo_lambda",
              "ignore_index", "compute_kl", "chunk_bytes", "backend", "compute_grad", "host_mask")


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[0], inputs[1], inputs[3]
    ctx.save_for_backward(output[7], output[8], output[9])
    ctx.mark_non_differentiable(*output[1:])  # only the loss is differentiable: no zero grads made for the rest
    ctx.set_materialize_grads(False)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    if gh.numel() == 0 and gw.numel() == 0:
        raise RuntimeError("fused_linear_preference_loss: backward called but gradients were not computed "
                           "(the inputs did not require grad when the forward ran)")
    grads = dict.fromkeys(_OP_INPUTS)  # every input without a gradient gets None, by name
    g = grad_loss.to(gw.dtype)
    grads["hidden"] = (gh * g.to(gh.dtype)) if gh.numel() else None
    grads["weight"] = (gw * g).to(ctx.dtypes[1])
    if ctx.has_bias:
        grads["bias"] = (gb * g).to(ctx.dtypes[2])
    return tuple(grads[name] for name in _OP_INPUTS)


torch.library.register_autograd("metapo_fast::fused_linear_preference_loss", _backward, setup_context=_setup_context)


class _FusedWithWeightsFn(torch.autograd.Function):
    """The op with a per-chunk weights callback (a Python callable, so eager only; the custom op
    above is what torch.compile sees). Same computation and the same backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, args, weights_fn):
        # below autograd, as the custom op's body runs (composite ops are not decomposed per chunk);
        # the callback itself runs with the default dispatch keys (see _Chunker._coefficients)
        with torch._C._AutoDispatchBelowAutograd():
            outs, c = _run(hidden, weight, args[0], bias, *args[1:], weights_fn=weights_fn)
        _setup_context(ctx, (hidden, weight, None, bias), outs)
        ctx.mark_non_differentiable(*outs[1:], c.pair_weights)
        return (*outs, c.pair_weights)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grads = dict(zip(_OP_INPUTS, _backward(ctx, grad_loss)))
        return grads["hidden"], grads["weight"], grads["bias"], None, None


def _nd(x: torch.Tensor) -> torch.Tensor:
    """``x`` without autograd history (a detach only when it has one: each is a dispatched op)."""
    return x.detach() if x.requires_grad else x


def _as_seq_ref(ref_logps) -> Optional[torch.Tensor]:
    if ref_logps is None or isinstance(ref_logps, torch.Tensor):
        return ref_logps
    if isinstance(ref_logps, (tuple, list)) and len(ref_logps) == 2:
        return torch.cat([ref_logps[0].reshape(-1), ref_logps[1].reshape(-1)])
    raise ValueError("ref_logps must be a (2B,) tensor or a (ref_chosen_logps, ref_rejected_logps) pair of (B,) tensors")


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ref_logps: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
    sample_weights: Optional[torch.Tensor] = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    focal_gamma: float = 1.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
    ignore_index: int = -100,
    compute_kl: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
    host_labels: Optional[torch.Tensor] = None,
    weights_fn: Optional[Callable] = None,
) -> PreferenceLossOutput:
    """Weighted pairwise preference loss from the LM head's inputs, fused and chunked.

    ``L = (1/B) sum_i w_i l_i(z_i)``, with ``l`` from the loss registry (``loss_type``: sigmoid,
    ipo, focal, simpo, orpo; docs/math.md section 2) and ``w`` the detached ``sample_weights``
    (ones by default). MetaPO paper Sec. 3.4 / Eq. 15.

    Args:
        hidden: ``(2B, T, H)`` policy hidden states, the B chosen rows first, then the B rejected.
        weight: ``(V, H)`` LM-head weight; ``bias``: optional ``(V,)``.
        labels: ``(2B, T)`` shifted labels; ``hidden[:, t]`` predicts ``labels[:, t]``;
            prompt and padding positions hold ``ignore_index``.
        ref_hidden, ref_weight, ref_bias: the reference model's last hidden states and head
            (gives reference log-probs and the token KL). Or ``ref_logps``: precomputed reference
            sequence log-probs, ``(2B,)`` or ``(ref_chosen, ref_rejected)`` (then no KL).
        sample_weights: ``(B,)`` per-pair weights (no gradient flows into them).
        loss_type, beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda: see
            :class:`metapo_fast.losses.LossParams`.
        compute_kl: compute the per-pair mean token KL (needs ``ref_hidden``).
        chunk_bytes: memory budget for one chunk's policy + reference logits.
        backend: epilogue implementation: ``auto`` | ``torch`` | ``triton`` | ``cpp``.
        host_labels: optional CPU copy of ``labels`` (the collated batch before its copy to the
            GPU). On CUDA it lets the op drop prompt and padding rows before the GEMMs without a
            host sync (row indices computed on the host); it must equal ``labels`` (the rows it marks
            are read as labelled). Ignored for CPU tensors (their own values are on the host).
        weights_fn: optional per-pair weights known only from this pass's statistics (MetaPO):
            ``weights_fn(pairs, stats) -> (n,)`` is called once per chunk, after the chunk's
            forward and before its gradient, with the indices of the chunk's pairs and their
            :class:`PreferenceLossOutput` (margins, log-probs, KL; ``loss`` None); its detached
            result weights those pairs. The policy logits are still computed once (8NHV; the
            alternative, a no-grad pass for the margins then a gradient pass, costs 10NHV). It may
            be called several times per batch, so it must be a per-pair function (no batch
            normalisation, no collectives). Eager only (a Python callable); excludes
            ``sample_weights``. The weights used are in the output's ``sample_weights``.

    Gradients flow to ``hidden``, ``weight`` and ``bias`` (the weight gradient is accumulated in
    fp32 across chunks). Returns a :class:`PreferenceLossOutput`.
    """
    ref_seq = _as_seq_ref(ref_logps)
    _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_seq, sample_weights, ignore_index)
    spec = get_loss(loss_type)
    if spec.needs_reference and ref_hidden is None and ref_seq is None:
        raise ValueError(f"loss_type={loss_type!r} needs a reference: pass ref_hidden and ref_weight, or ref_logps")
    params = LossParams(beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda)  # validates
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    compute_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    host_mask = host_label_mask(labels, host_labels, ignore_index)
    args = (labels.contiguous(), None if ref_hidden is None else _nd(ref_hidden).contiguous(),
            None if ref_weight is None else _nd(ref_weight).contiguous(), None if ref_bias is None else _nd(ref_bias),
            None if ref_seq is None else _nd(ref_seq), None if sample_weights is None else _nd(sample_weights),
            loss_type, params.beta, params.label_smoothing, params.focal_gamma, params.simpo_gamma, params.orpo_lambda,
            ignore_index, compute_kl, int(chunk_bytes), backend, compute_grad, host_mask)
    used_weights = sample_weights
    if weights_fn is not None:
        if sample_weights is not None:
            raise ValueError("give either sample_weights or weights_fn, not both")
        if torch.compiler.is_compiling():
            raise ValueError("weights_fn (a Python callable) runs in eager mode only; under torch.compile pass sample_weights")
        out = _FusedWithWeightsFn.apply(hidden.contiguous(), weight.contiguous(), bias, args, weights_fn)
        used_weights = out[10].detach()
    else:
        out = _fused_op(hidden.contiguous(), weight.contiguous(), args[0], bias, *args[1:])
    loss, per_pair, logit, seq, counts, ref, kl_sum = out[:7]
    bsz = hidden.shape[0] // 2
    has_ref = ref.numel() > 0
    kl = None
    if kl_sum.numel() > 0:
        kl = _nd((kl_sum[:bsz] + kl_sum[bsz:]) / (counts[:bsz] + counts[bsz:]).clamp(min=1))
    seq, counts = _nd(seq), _nd(counts)
    return PreferenceLossOutput(
        loss=loss, per_pair_loss=_nd(per_pair), margins=_nd(logit),
        chosen_logps=seq[:bsz], rejected_logps=seq[bsz:], chosen_counts=counts[:bsz], rejected_counts=counts[bsz:],
        ref_chosen_logps=_nd(ref[:bsz]) if has_ref else None, ref_rejected_logps=_nd(ref[bsz:]) if has_ref else None,
        kl=kl, beta=params.beta, sample_weights=used_weights,
    )


@torch.no_grad()
def fused_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                         ignore_index: int = -100, chunk_bytes: int = DEFAULT_CHUNK_BYTES, backend: str = "auto") -> torch.Tensor:
    """``(2B,)`` sums of the response log-probs (the B chosen rows, then the B rejected ones),
    through the fused op: chunked, no full logits. No gradient (reference log-probs, statistics)."""
    # any reference-free loss gives the per-sequence sums; its loss value is discarded
    out = fused_linear_preference_loss(hidden, weight, labels, bias=bias, loss_type="simpo", ignore_index=ignore_index,
                                       compute_kl=False, chunk_bytes=chunk_bytes, backend=backend)
    return torch.cat([out.chosen_logps, out.rejected_logps])


class FusedLinearPreferenceLoss(nn.Module):
    """``nn.Module`` around :func:`fused_linear_preference_loss` holding the loss settings.

    ``forward(hidden, weight, labels, **tensors)`` takes the tensors of the functional form
    (``bias``, ``ref_hidden``, ``ref_weight``, ``ref_bias``, ``ref_logps``, ``sample_weights``).
    """

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 focal_gamma: float = 1.0, simpo_gamma: float = 0.5, orpo_lambda: float = 0.1,
                 ignore_index: int = -100, compute_kl: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 backend: str = "auto"):
        super().__init__()
        get_loss(loss_type)
        params = LossParams(beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda)  # validates
        self.kwargs = dict(loss_type=loss_type, **params.kwargs(), ignore_index=ignore_index, compute_kl=compute_kl,
                           chunk_bytes=chunk_bytes, backend=backend)

    def forward(self, hidden, weight, labels, **tensors) -> PreferenceLossOutput:
        return fused_linear_preference_loss(hidden, weight, labels, **tensors, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
