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

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .chunking import DEFAULT_CHUNK_BYTES, ChunkSchedule, checked_host_labels, compact_rows, pair_rows_on_device
from .dispatch import BACKENDS
from ..losses import LossParams, PairBatch, get_loss, sequence_coefficients
from .lce_epilogue import check_label_values, compute_dtype, lce_epilogue_backward_, lce_epilogue_forward_into

__all__ = ["PreferenceLossOutput", "fused_linear_preference_loss", "fused_sequence_logps", "FusedLinearPreferenceLoss",
           "DEFAULT_CHUNK_BYTES"]

# Dispatch-key TLS of ordinary eager code, captured at import (see _Chunker._group_done).
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
    costs no op: they are the group's slice of the margins buffer)."""

    def __init__(self, chunker: "_Chunker", g: int):
        object.__setattr__(self, "_src", (chunker, g))
        self.loss, self.beta = None, chunker.params.beta

    def __getattr__(self, name):
        if name.startswith("__") or name == "_src":
            raise AttributeError(name)
        c, g = self._src
        if name == "margins":
            value = c.grp_z[g]
        elif name == "per_pair_loss":
            value = c.spec.fn(c._group_batch(g), c.params)[0]
        else:
            values = c._group_fields(g)
            if name not in values:
                raise AttributeError(name)
            value = values[name]
        setattr(self, name, value)
        return value

    def __repr__(self):
        return f"_LazyPairStats(group={self._src[1]})"


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_FORCED_PREGATHER: Optional[bool] = None


@contextlib.contextmanager
def force_pregather(flag: bool):
    """Tests: gather the rows' hidden states once per call (True) or block by block (False),
    whatever the budget says (the two ways of :class:`_Chunker`)."""
    global _FORCED_PREGATHER
    old, _FORCED_PREGATHER = _FORCED_PREGATHER, bool(flag)
    try:
        yield
    finally:
        _FORCED_PREGATHER = old


def _host(a: np.ndarray) -> torch.Tensor:
    """A host NumPy array as a CPU tensor, zero-copy (DLPack: no tensor op)."""
    return torch.from_dlpack(np.ascontiguousarray(a))


class _Chunker:
    """The fused loss's loop over :class:`~.chunking.PairLayout`.

    Buffers (built once per call; host arrays are copied to the device in one queued copy each):

    * ``buf (R, K)``: one row per scheduled row (block after block), columns ``logp, [ref_logp,
      kl], count``; the epilogue writes the first columns of its block (``lce_epilogue_forward_into``),
      the count column is 1 (unlabelled rows, kept when every row goes through the GEMMs, are
      masked by ``P``, built on the device with the mask then).
    * ``S (3B, K)``: per group g (pairs ``[i0, i1)``, n of them) rows ``3 i0 .. 3 i1 - 1``: the n
      chosen sequences, the n rejected, the n pairs, each the sum of its rows of ``buf``; one GEMM
      ``S_g = P_g^T buf_g`` with the host-built 0/1 ``P_g^T (3n, R_g)`` (masked on the device when
      every row is kept). The op returns it in sequence order (``stats``, see :func:`_run`).
    * ``z (B,)``: the loss's logit per pair; for the DPO-margin losses one GEMM per group from
      ``S_g`` (``z_g = vec(S_g) Zc_n``); ``coef (1, 2B)``: ``dL/dlogp_s`` in layout order, one GEMM
      ``coef_g = l'(z_g) w_g Dc_n`` (closed forms of :mod:`metapo_fast.losses`, autograd for a loss
      without one).
    * ``h_all (R, H)``: the rows' hidden states gathered once, when they fit the chunk budget; each
      block's hidden-state gradient rows are then written over its slice after their last use, and
      copied into ``grad_hidden`` once at the end. Otherwise each block gathers its rows and copies
      its gradient rows into ``grad_hidden`` itself (transient memory within the budget for any T).

    Whole-pairs groups: the block's forward, the group's coefficients, the backward epilogue with
    each row's coefficient, then ``G_b = g W`` and ``grad_W += g^T h``. Streamed pairs: each block
    (one sequence's rows) runs the forward and the coefficient-1 backward in one epilogue call,
    ``G_b`` and its side's ``V x H`` accumulator take the unscaled gradient; when the pair is done
    ``grad_W += [c_w, c_l] [A_w; A_l]`` (one GEMM) and at the end each ``G`` row is scaled by its
    sequence's coefficient. The policy logits are computed once either way (8NHV)."""

    def __init__(self, hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_seq, sample_weights,
                 spec, params, ignore_index, compute_kl, chunk_bytes, backend, compute_grad, host_labels=None,
                 weights_fn=None):
        self.b2, self.t, self.h = hidden.shape
        self.bsz = bsz = self.b2 // 2
        self.v = weight.shape[0]
        self.hidden = hidden.reshape(-1, self.h)
        self.weight, self.bias, self.ref_weight, self.ref_bias = weight, bias, ref_weight, ref_bias
        labels_np = np.from_dlpack(labels).reshape(-1) if labels.device.type == "cpu" else None  # host data (no tensor op)
        if labels_np is not None:  # the C++ epilogue indexes with them
            check_label_values(labels, self.v, ignore_index, host=labels_np.reshape(labels.shape))
        self.spec, self.params, self.backend = spec, params, backend
        self.has_ref_logits = ref_hidden is not None
        self.compute_kl = compute_kl and self.has_ref_logits
        self.weights_fn = weights_fn
        self.weights = None if sample_weights is None else sample_weights.to(compute_dtype(hidden.dtype))
        self.compute_grad = compute_grad
        self.cd = cd = compute_dtype(hidden.dtype)
        dev = hidden.device
        self.K = K = 4 if self.has_ref_logits else 2  # logp, [ref_logp, kl], count
        rows = ChunkSchedule.rows_for(chunk_bytes, self.v, hidden.element_size(), self.has_ref_logits)
        rows = pair_rows_on_device(rows, self.t, self.v, hidden.element_size(), self.has_ref_logits, dev)
        compact = compact_rows(dev)
        host_np = None  # the host's labels, flat, when the rule is the host's
        if labels_np is not None and (compact or host_labels is not None):  # CPU labels: their own mask and targets
            host_np = labels_np  # (a CPU host_labels copy is not needed, not trusted)
        elif host_labels is not None:  # the trainer's host copy: mask and targets read on the host, checked there
            host_np = np.from_dlpack(host_labels).reshape(-1)
            check_label_values(host_labels, self.v, ignore_index, host=host_np.reshape(labels.shape))
        # exact: the rule's mask is on the host, so every scheduled row carries a label (no device mask)
        self.exact = exact = host_np is not None
        mask = None
        if exact:
            self.schedule = ChunkSchedule(None, self.b2, self.t, rows, compact=compact, host_mask=host_np != ignore_index,
                                          device=dev)
        else:
            mask = labels.reshape(-1) != ignore_index
            self.schedule = ChunkSchedule(mask, self.b2, self.t, rows, compact=compact, device=dev)
        self.streamed = not self.schedule.pairs_fit
        lay = self.layout = self.schedule.layout(self.streamed)
        groups, R = lay.groups, len(lay.rows_host)
        n_list = [i1 - i0 for i0, i1 in groups]
        self.n_list = n_list
        sizes = [n for bl in lay.blocks for n, _ in bl]
        # host arithmetic: per row its layout sequence (2 i0 + col) and pair within the group
        g_of_row = np.repeat(np.arange(len(groups)), lay.group_rows)
        i0s = np.array([i0 for i0, _ in groups], dtype=np.int64)
        ns = np.array(n_list, dtype=np.int64)
        lrow = 2 * i0s[g_of_row] + lay.col_host
        side, j = lay.col_host // ns[g_of_row], lay.col_host % ns[g_of_row]
        # pos3: sequence-order row of S (chosen i, rejected i, pair i) -> its layout row
        pair = np.arange(bsz)
        g_of_pair = np.repeat(np.arange(len(groups)), n_list)
        base = 3 * i0s[g_of_pair] + (pair - i0s[g_of_pair])
        pos3 = np.concatenate([base, base + ns[g_of_pair], base + 2 * ns[g_of_pair]])
        # one queued copy of the int data: rows, targets (the host's labels), each row's layout sequence, pos3, and
        # each sequence's layout position
        tgt_host = (host_np.astype(np.int64, copy=False)[lay.rows_host] if exact else np.zeros(R, dtype=np.int64))
        ints = np.concatenate([lay.rows_host, tgt_host, lrow, pos3, lay.pos_host, pair]).astype(np.int64, copy=False)
        (self.rows, tgt_all, self.lrow, self.pos3, self.lpos,
         pairs) = self.schedule.to_device(_host(ints)).split([R, R, R, 3 * bsz, 2 * bsz, bsz])
        if exact:
            m_all = None
        else:  # every row kept: the mask on the device; targets of unlabelled rows are 0
            flat_labels = labels.reshape(-1)
            tgt_all = torch.where(mask, flat_labels, 0).index_select(0, self.rows)
            m_all = mask.to(cd).index_select(0, self.rows)
            self.blk_m = m_all.split(sizes)
        self.blk_tgt = tgt_all.split(sizes)
        # The rows' hidden states: gathered once when they fit the chunk budget (the buffer then takes the rows'
        # hidden-state gradients too, written over each block's rows after their last use), else block by block, so
        # the transient memory stays within the budget whatever T.
        ref_flat = None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1])
        ref_row_bytes = 0 if ref_flat is None else ref_flat.shape[1] * ref_flat.element_size()
        self.pregather = (R * (self.h * hidden.element_size() + ref_row_bytes) <= chunk_bytes if _FORCED_PREGATHER is None
                          else _FORCED_PREGATHER)
        if self.pregather:
            self.h_all = self.hidden.index_select(0, self.rows)
            self.blk_h = self.h_all.split(sizes)
            self.blk_ref_h = None if ref_flat is None else ref_flat.index_select(0, self.rows).split(sizes)
        else:
            self.blk_rows, self.ref_flat = self.rows.split(sizes), ref_flat
        buf = torch.ones(R, K, dtype=cd, device=dev)  # per-row statistics; count column 1 (masked via P when not exact)
        self.blk_buf, self.grp_buf = buf.split(sizes), buf.split(lay.group_rows)
        # P^T of every group, side by side: (3 n_max, R), 0/1 (times the mask when every row is kept)
        n_max = max(n_list)
        PT_host = np.zeros((3 * n_max, R), dtype=_NP_DTYPES[cd])
        ar = np.arange(R)
        n_r = ns[g_of_row]
        if exact:
            PT_host[side * n_r + j, ar] = 1
            PT_host[2 * n_r + j, ar] = 1
            PT = self.schedule.to_device(_host(PT_host))
        else:
            idx = self.schedule.to_device(_host(np.concatenate([(side * n_r + j) * R + ar, (2 * n_r + j) * R + ar])))
            PT = torch.zeros(3 * n_max * R, dtype=cd, device=dev).index_put_((idx,), m_all.repeat(2)).view(3 * n_max, R)
        self.grp_PT = list(PT.split(lay.group_rows, dim=1))
        if n_list[-1] != n_max:
            self.grp_PT[-1] = self.grp_PT[-1][: 3 * n_list[-1]]
        self.S = S = torch.empty(3 * bsz, K, dtype=cd, device=dev)  # every row written by its group's GEMM
        self.grp_S = S.split([3 * n for n in n_list])
        self.logit_path = spec.logit_grad is not None
        if self.logit_path:
            self.grp_Sflat = S.view(1, -1).split([3 * n * K for n in n_list], dim=1)
        self.z = torch.empty(bsz, dtype=cd, device=dev)
        self.grp_z2 = self.z.view(1, bsz).split(n_list, dim=1)  # (1, n) views for the GEMMs; (n,) views for a callback:
        self.grp_z = self.z.split(n_list) if weights_fn is not None or not self.logit_path else None
        self.ref_given = None if ref_seq is None else ref_seq.to(cd)
        self.grp_zref = None
        if self.ref_given is not None and self.logit_path:  # z = beta (logp_w - logp_l) - beta (ref_w - ref_l)
            zref = (self.ref_given[bsz:] - self.ref_given[:bsz]).mul_(params.beta)
            self.grp_zref = zref.view(1, bsz).split(n_list, dim=1)
        self.grp_w = None if self.weights is None else self.weights.split(n_list)
        self.grp_pairs = pairs.split(n_list) if weights_fn is not None else None
        self.used_w: list = []
        self._consts: dict = {}
        if compute_grad:
            self.coef = torch.empty(1, 2 * bsz, dtype=cd, device=dev)  # every entry written by its group
            self.grp_coef = self.coef.split([2 * n for n in n_list], dim=1)
            gdt = torch.float32 if cd == torch.float32 else cd
            self.grad_weight = torch.zeros(weight.shape, dtype=gdt, device=dev)
            self.grad_bias = None if bias is None else torch.zeros(self.v, dtype=gdt, device=dev)
            if not self.pregather:  # the gradient rows go into it block by block
                self.grad_hidden = torch.zeros_like(self.hidden)
            if not self.streamed:
                self.blk_lrow = self.lrow.split(sizes)
                self.coef_flat = self.coef.view(-1)

    # -- constants of the DPO-margin losses, per group size n: z = vec(S_g) Zc, coef = l'(z) w Dc ------
    def _margin_consts(self, n: int):
        c = self._consts.get(n)
        if c is None:  # built on the host: one queued copy each
            K, beta, inv_b = self.K, self.params.beta, 1.0 / self.bsz
            a = np.zeros(K)
            a[0] = 1.0
            if self.has_ref_logits:
                a[1] = -1.0
            zc = np.zeros((3 * n, K, n))
            for j in range(n):
                zc[j, :, j] = beta * a
                zc[n + j, :, j] = -beta * a
            dc = np.zeros((n, 2 * n))
            dc[np.arange(n), np.arange(n)] = beta * inv_b
            dc[np.arange(n), n + np.arange(n)] = -beta * inv_b
            dt = _NP_DTYPES[self.cd]
            c = self._consts[n] = (self.schedule.to_device(_host(zc.reshape(3 * n * K, n).astype(dt))),
                                   self.schedule.to_device(_host(dc.astype(dt))))
        return c

    # -- the statistics of a group, as the losses see them -----------------------------------------
    def _pair_batch(self, S: torch.Tensor, i0: int, i1: int) -> PairBatch:
        """Pairs ``[i0, i1)`` as the losses see them, from rows of ``S``'s layout (their n chosen
        sequences, then their n rejected: a group's ``S_g``, or the whole ``stats``)."""
        n = i1 - i0
        if self.has_ref_logits:
            ref_w, ref_l = S[:n, 1], S[n:2 * n, 1]
        elif self.ref_given is not None:
            ref_w, ref_l = self.ref_given[i0:i1], self.ref_given[self.bsz + i0:self.bsz + i1]
        else:
            ref_w = ref_l = None
        return PairBatch(S[:n, 0], S[n:2 * n, 0], S[:n, -1], S[n:2 * n, -1], ref_w, ref_l)

    def _group_batch(self, g: int) -> PairBatch:
        return self._pair_batch(self.grp_S[g], *self.layout.groups[g])

    def _group_fields(self, g: int) -> dict:
        b = self._group_batch(g)
        kl = None
        if self.compute_kl:
            n, Sg = self.n_list[g], self.grp_S[g]
            kl = Sg[2 * n:, 2] / Sg[2 * n:, -1].clamp(min=1)
        return dict(chosen_logps=b.chosen_logps, rejected_logps=b.rejected_logps, chosen_counts=b.chosen_counts,
                    rejected_counts=b.rejected_counts, ref_chosen_logps=b.ref_chosen_logps,
                    ref_rejected_logps=b.ref_rejected_logps, kl=kl)

    def _group_done(self, g: int) -> None:
        """Group g's statistics are in ``buf``: its rows of S, its logits z, its weights and (with
        gradients) its coefficients ``coef_g = dL/dlogp_s`` (layout order, ``(1, 2n)``): ``L = sum_i w_i
        l_i / B`` with w detached, so ``c_s = w_i dl_i/dlogp_s / B``."""
        n, spec = self.n_list[g], self.spec
        torch.mm(self.grp_PT[g], self.grp_buf[g], out=self.grp_S[g])
        if self.logit_path:
            zc, dc = self._margin_consts(n)
            if self.grp_zref is None:
                torch.mm(self.grp_Sflat[g], zc, out=self.grp_z2[g])
            else:
                torch.addmm(self.grp_zref[g], self.grp_Sflat[g], zc, out=self.grp_z2[g])
        else:
            self.grp_z[g].copy_(spec.fn(self._group_batch(g), self.params)[1])
        w = None
        if self.weights_fn is not None:
            with torch._C._ForceDispatchKeyGuard(*_DEFAULT_DISPATCH_TLS):
                w = self.weights_fn(self.grp_pairs[g], _LazyPairStats(self, g))
            if w.requires_grad:
                w = w.detach()
            if w.dtype != self.cd or w.dim() != 1:
                w = w.to(self.cd).reshape(-1)
            self.used_w.append(w)
        elif self.grp_w is not None:
            w = self.grp_w[g]
        if not self.compute_grad:
            return
        if self.logit_path:
            d = spec.logit_grad(self.grp_z2[g], self.params)
            torch.mm(d if w is None else d * w, dc, out=self.grp_coef[g])
            return
        b = self._group_batch(g)
        if spec.grad is not None:
            d_w, d_l = spec.grad(b, self.params)
            coef = torch.cat([d_w, d_l])
            coef = (coef if w is None else coef * w.repeat(2)) / self.bsz
        else:
            ref = None if b.ref_chosen_logps is None else torch.cat([b.ref_chosen_logps, b.ref_rejected_logps])
            Sg = self.grp_S[g]
            # A custom op's body runs with autograd (and torch.func, under torch.compile) excluded from
            # dispatch; the autograd fallback runs with the default dispatch TLS.
            with torch._C._ForceDispatchKeyGuard(*_DEFAULT_DISPATCH_TLS):
                coef = sequence_coefficients(spec, self.params, Sg[:2 * n, 0], Sg[:2 * n, -1], ref, w, denom=self.bsz)[3]
        self.grp_coef[g].copy_(coef.view(1, -1))

    # -- the loop -----------------------------------------------------------------------------------
    def _logits(self, b: int):
        """Block b's hidden rows (gathered now unless gathered once), policy and reference logits."""
        h = self.blk_h[b] if self.pregather else self.hidden.index_select(0, self.blk_rows[b])
        logits = F.linear(h, self.weight, self.bias)
        ref_logits = None
        if self.has_ref_logits:
            ref_h = self.blk_ref_h[b] if self.pregather else self.ref_flat.index_select(0, self.blk_rows[b])
            ref_logits = F.linear(ref_h, self.ref_weight, self.ref_bias)
        return h, logits, ref_logits

    def _grad_rows(self, b: int, h: torch.Tensor, g: torch.Tensor) -> None:
        """Block b's hidden-state gradient rows ``g W``, written over its hidden rows ``h`` (used for the
        last time), then into ``grad_hidden`` unless the whole row buffer is copied at the end."""
        torch.mm(g, self.weight, out=h)
        if not self.pregather:
            self.grad_hidden.index_copy_(0, self.blk_rows[b], h)

    def run(self):
        lay, b, grad = self.layout, 0, self.compute_grad
        fused = self.exact  # streamed blocks: forward + coefficient-1 backward in one epilogue call
        if self.streamed and grad:
            gdt = self.grad_weight.dtype
            acc = torch.empty((2, *self.grad_weight.shape), dtype=gdt, device=self.S.device)
            acc_w, acc_row, gw_row = acc.unbind(0), acc.view(2, -1), self.grad_weight.view(1, -1)
            acc_b = None if self.grad_bias is None else torch.empty(2, self.v, dtype=gdt, device=self.S.device)
        for g, blocks in enumerate(lay.blocks):
            if self.streamed:
                seen = [False, False]
                for _, side in blocks:
                    h, logits, ref_logits = self._logits(b)
                    if not grad:
                        lce_epilogue_forward_into(logits, self.blk_tgt[b], ref_logits, self.blk_buf[b],
                                                  backend=self.backend, validate=False)
                    else:  # coefficient 1 now, c_s applied when the pair is done
                        if fused:
                            lce_epilogue_forward_into(logits, self.blk_tgt[b], ref_logits, self.blk_buf[b], grad=True,
                                                      backend=self.backend, validate=False)
                        else:  # every row kept: coefficient = the row's mask
                            lse = lce_epilogue_forward_into(logits, self.blk_tgt[b], ref_logits, self.blk_buf[b],
                                                            backend=self.backend, validate=False)
                            lce_epilogue_backward_(logits, lse, self.blk_tgt[b], self.blk_m[b], backend=self.backend,
                                                   validate=False)
                        _mm_into_(acc_w[side], logits.t(), h, accumulate=seen[side])
                        if acc_b is not None:
                            if seen[side]:
                                acc_b[side].add_(logits.sum(0, dtype=gdt))
                            else:
                                torch.sum(logits, 0, dtype=gdt, out=acc_b[side])
                        self._grad_rows(b, h, logits)
                        seen[side] = True
                    del logits, h, ref_logits
                    b += 1
                self._group_done(g)
                if grad and (seen[0] or seen[1]):  # grad_W += c_w A_w + c_l A_l
                    for s in (0, 1):
                        if not seen[s]:
                            acc_w[s].zero_()
                            if acc_b is not None:
                                acc_b[s].zero_()
                    gw_row.addmm_(self.grp_coef[g], acc_row)
                    if acc_b is not None:
                        self.grad_bias.view(1, -1).addmm_(self.grp_coef[g], acc_b)
                continue
            kept = None
            (_,) = blocks  # whole pairs: one block, the group's rows
            h, logits, ref_logits = self._logits(b)
            lse = lce_epilogue_forward_into(logits, self.blk_tgt[b], ref_logits, self.blk_buf[b],
                                            backend=self.backend, validate=False)
            del ref_logits
            kb, b = b, b + 1
            self._group_done(g)
            if grad:
                coef_rows = self.coef_flat.index_select(0, self.blk_lrow[kb])
                if not self.exact:
                    coef_rows.mul_(self.blk_m[kb])
                lce_epilogue_backward_(logits, lse, self.blk_tgt[kb], coef_rows, backend=self.backend, validate=False)
                _add_mm_(self.grad_weight, logits.t(), h)
                if self.grad_bias is not None:
                    self.grad_bias.add_(logits.sum(0, dtype=self.grad_bias.dtype))
                self._grad_rows(kb, h, logits)
            del logits, h
        return self._finish()

    def _finish(self):
        bsz = self.bsz
        if self.compute_grad:
            # streamed: each gradient row times its sequence's coefficient (unlabelled rows are 0 already)
            if self.pregather:
                if self.streamed:
                    self.h_all.mul_(self.coef.view(-1, 1).index_select(0, self.lrow))
                self.grad_hidden = torch.zeros_like(self.hidden)
                self.grad_hidden.index_copy_(0, self.rows, self.h_all)
            elif self.streamed:
                self.grad_hidden.view(self.b2, -1).mul_(self.coef.view(-1, 1).index_select(0, self.lpos))
        self.stats = self.S.index_select(0, self.pos3)  # sequence order: chosen, rejected, pairs
        self.pair_weights = torch.cat(self.used_w) if self.weights_fn is not None else None
        w = self.pair_weights if self.pair_weights is not None else self.weights
        if self.spec.logit_loss is not None:
            per_pair = self.spec.logit_loss(self.z, self.params)
        else:
            per_pair = self.spec.fn(self._pair_batch(self.stats, 0, bsz), self.params)[0]
        self.per_pair, self.logit = per_pair, self.z
        self.loss = per_pair.mean() if w is None else torch.dot(w, per_pair) / bsz
        return self


def _mm_into_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b``: accumulate, or overwrite whatever ``out`` held (beta = 0 ignores it, NaN
    included); like :func:`_add_mm_`, without a temporary of out's size where the dtypes allow."""
    if accumulate:
        _add_mm_(out, a, b)
        return
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=0, out=out)
        return
    if out.is_cuda:
        try:
            torch.addmm(out, a, b, beta=0, out_dtype=out.dtype, out=out)
            return
        except (RuntimeError, TypeError) as err:
            _out_dtype_refused(err)
    out.copy_(a @ b)


_OUT_DTYPE_FALLBACK: list = []  # the reason, once CUDA refused addmm's out_dtype (tests read it)


def _out_dtype_refused(err: Exception) -> None:
    if not _OUT_DTYPE_FALLBACK:
        _OUT_DTYPE_FALLBACK.append(str(err))
        warnings.warn(f"fused loss: torch.addmm(out_dtype=) is unavailable here ({err}); bf16/fp16 weight gradients "
                      "go into the fp32 accumulators through a V x H temporary per chunk", stacklevel=3)


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
        except (RuntimeError, TypeError) as err:
            _out_dtype_refused(err)
    out.add_(a @ b)


# ---------------------------------------------------------------------------------------------
# torch.library custom op (opaque to torch.compile) with a fake implementation and autograd.
# ---------------------------------------------------------------------------------------------
_EMPTY = (0,)


def _run(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights, loss_type, beta,
         label_smoothing, focal_gamma, simpo_gamma, orpo_lambda, ignore_index, compute_kl, chunk_bytes, backend,
         compute_grad, host_labels=None, weights_fn=None):
    """The op's computation: its seven outputs, and the chunker (for the weights a callback gave).

    Outputs: ``loss``, ``per_pair (B,)``, ``logit (B,)``, ``stats (3B, K)``, ``grad_hidden``,
    ``grad_weight``, ``grad_bias`` (empty when absent). ``stats`` rows are the B chosen sequences,
    the B rejected, then the B pairs (both sequences' tokens); columns are the sums over those
    tokens of the log-prob, with reference logits of the reference log-prob and the token KL, and
    last the token count (``K`` = 4 with reference logits, else 2)."""
    params = LossParams(beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda)
    c = _Chunker(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights,
                 get_loss(loss_type), params, ignore_index, compute_kl, chunk_bytes, backend, compute_grad,
                 host_labels=host_labels, weights_fn=weights_fn).run()
    if compute_grad:
        gh = c.grad_hidden.view_as(hidden)
        gw = c.grad_weight
        gb = c.grad_bias if c.grad_bias is not None else hidden.new_empty(_EMPTY, dtype=c.cd)
    else:  # one fresh tensor per absent output: outputs may not alias each other
        gh, gw, gb = (hidden.new_empty(_EMPTY, dtype=c.cd) for _ in range(3))
    return (c.loss, c.per_pair, c.logit, c.stats, gh, gw, gb), c


@torch.library.custom_op("metapo_fast::fused_linear_preference_loss", mutates_args=())
def _fused_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor], sample_weights: Optional[torch.Tensor],
    loss_type: str, beta: float, label_smoothing: float, focal_gamma: float, simpo_gamma: float, orpo_lambda: float,
    ignore_index: int, compute_kl: bool, chunk_bytes: int, backend: str, compute_grad: bool,
    host_labels: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights, loss_type,
                beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda, ignore_index, compute_kl, chunk_bytes,
                backend, compute_grad, host_labels)[0]


@_fused_op.register_fake
def _fused_op_fake(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, sample_weights,
                   loss_type, beta, label_smoothing, focal_gamma, simpo_gamma, orpo_lambda, ignore_index,
                   compute_kl, chunk_bytes, backend, compute_grad, host_labels=None):
    cd = compute_dtype(hidden.dtype)
    b2 = hidden.shape[0]
    new = lambda *s, dtype=cd: hidden.new_empty(s, dtype=dtype)  # noqa: E731
    stats = new(3 * (b2 // 2), 4 if ref_hidden is not None else 2)
    if compute_grad:
        gw_dtype = torch.float32 if cd == torch.float32 else cd
        gh, gw = new(*hidden.shape, dtype=hidden.dtype), new(*weight.shape, dtype=gw_dtype)
        gb = new(weight.shape[0], dtype=gw_dtype) if bias is not None else new(0)
    else:
        gh, gw, gb = new(0), new(0), new(0)
    return new(), new(b2 // 2), new(b2 // 2), stats, gh, gw, gb


_OP_INPUTS = ("hidden", "weight", "labels", "bias", "ref_hidden", "ref_weight", "ref_bias", "ref_logps",
              "sample_weights", "loss_type", "beta", "label_smoothing", "focal_gamma", "simpo_gamma", "orpo_lambda",
              "ignore_index", "compute_kl", "chunk_bytes", "backend", "compute_grad", "host_labels")


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[0], inputs[1], inputs[3]
    ctx.save_for_backward(output[4], output[5], output[6])
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
        # the callback itself runs with the default dispatch keys (see _Chunker._group_done)
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
            host sync (row indices computed on the host); it must equal ``labels``: its mask and its
            values (the targets) are the ones used, and its values are checked on the host. Ignored
            for CPU tensors (their own values are on the host).
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
    host_labels = checked_host_labels(labels, host_labels)
    args = (labels.contiguous(), None if ref_hidden is None else _nd(ref_hidden).contiguous(),
            None if ref_weight is None else _nd(ref_weight).contiguous(), None if ref_bias is None else _nd(ref_bias),
            None if ref_seq is None else _nd(ref_seq), None if sample_weights is None else _nd(sample_weights),
            loss_type, params.beta, params.label_smoothing, params.focal_gamma, params.simpo_gamma, params.orpo_lambda,
            ignore_index, compute_kl, int(chunk_bytes), backend, compute_grad, host_labels)
    used_weights = sample_weights
    if weights_fn is not None:
        if sample_weights is not None:
            raise ValueError("give either sample_weights or weights_fn, not both")
        if torch.compiler.is_compiling():
            raise ValueError("weights_fn (a Python callable) runs in eager mode only; under torch.compile pass sample_weights")
        out = _FusedWithWeightsFn.apply(hidden.contiguous(), weight.contiguous(), bias, args, weights_fn)
        used_weights = _nd(out[7])
    else:
        out = _fused_op(hidden.contiguous(), weight.contiguous(), args[0], bias, *args[1:])
    loss, per_pair, logit, stats = out[:4]
    bsz = hidden.shape[0] // 2
    ch, rj, pa = stats.view(3, bsz, -1).unbind(0)  # (B, K) each: chosen, rejected, pair
    ch, rj = ch.unbind(1), rj.unbind(1)
    kl = ref_w = ref_l = None
    if ref_hidden is not None:
        ref_w, ref_l = ch[1], rj[1]
        if compute_kl:
            pa = pa.unbind(1)
            kl = pa[2] / pa[3].clamp(min=1)
    elif ref_seq is not None:
        ref_w, ref_l = _nd(ref_seq).split(bsz)
    return PreferenceLossOutput(
        loss=loss, per_pair_loss=per_pair, margins=logit, chosen_logps=ch[0], rejected_logps=rj[0],
        chosen_counts=ch[-1], rejected_counts=rj[-1], ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
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
