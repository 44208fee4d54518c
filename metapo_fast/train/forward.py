"""One micro-batch's forward, the same for training, evaluation and the meta-update's validation
batch: the policy's and the reference's last hidden states, then the fused loss.

MetaPO's weights depend on this step's margins. With a per-pair weights function
(``chunk_weights_fn(pairs, stats)``) the fused loss calls it chunk by chunk, between each chunk's
forward and its gradient: one pass, the LM head's 8NHV floor. With a whole-batch ``weights_fn(stats)``
(one that normalises over the batch or talks to other ranks) the forward is two fused-loss passes:
a no-grad pass gives the margins z and KL, ``weights_fn(stats)`` the weights, and the gradient pass
reuses the reference log-probs of the first pass (10NHV). Plain DPO/FocalPO/SimPO take the single
pass. On CUDA the fused loss also gets the host's copy of the labels, so prompt and padding rows
never enter the LM-head GEMMs (no host sync).

Under ZeRO-3 the LM heads are gathered only after both decoder forwards: with tied embeddings the
embedding's post-forward hook would release a head gathered earlier. The policy head stays
gathered on the caller's ``stack`` (through its backward); the reference head only for the fused
loss's forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..losses import LossParams
from ..models.hf import last_hidden_states, lm_head_of, pack_plan, reference_head_inputs, reference_hidden_states
from ..ops.preference_loss import PreferenceLossOutput, fused_linear_preference_loss, fused_sequence_logps

__all__ = ["PairForward"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


class PairForward:
    """Policy + reference -> fused loss, for the batches of the collator.

    Args:
        model: the policy (the DeepSpeed engine's module when sharded).
        ref: the frozen reference or None (reference-free losses).
        eng: the engine (``begin_forward``, ``head_gathered``).
        device: the training device.
        loss_type, params, chunk_bytes, backend: the fused loss's settings.
        ref_head: context manager that gathers the reference head (ZeRO-3), else a null context.
        ref_begin_forward: resets the sharded reference's fetch trace (ZeRO-3), else a no-op.
    """

    def __init__(self, model: nn.Module, ref: Optional[nn.Module], eng, device: torch.device, loss_type: str,
                 params: LossParams, chunk_bytes: int, backend: str,
                 ref_head: Callable = contextlib.nullcontext, ref_begin_forward: Callable = lambda: None):
        self.model, self.ref, self.eng, self.device = model, ref, eng, device
        self.loss_kw = dict(loss_type=loss_type, **params.kwargs(), chunk_bytes=chunk_bytes, backend=backend)
        self._ref_head, self._ref_begin_forward = ref_head, ref_begin_forward

    def _to_device(self, batch: dict):
        return (batch[k].to(self.device, non_blocking=True) for k in BATCH_KEYS)

    def __call__(self, batch: dict, weights_fn: Optional[Callable] = None, *, stack: contextlib.ExitStack,
                 weights: Optional[torch.Tensor] = None, chunk_weights_fn: Optional[Callable] = None
                 ) -> tuple[PreferenceLossOutput, PreferenceLossOutput, Optional[torch.Tensor]]:
        """``(out, stats, w)``: the loss to differentiate, the per-pair statistics (margins, KL,
        log-probs; the same object as ``out`` without ``weights_fn``) and the weights (or None).
        ``weights`` known before the forward (the static filter) and ``chunk_weights_fn(pairs,
        stats) -> (n,)`` (per-pair weights from the pairs' own statistics, called once per chunk;
        see ``fused_linear_preference_loss(weights_fn=)``) take the single pass; ``weights_fn``
        (whole batch) the two passes."""
        ids, mask, labels = self._to_device(batch)
        host_labels = batch["labels"] if batch["labels"].device.type == "cpu" else None
        plan = pack_plan(self.model, batch["attention_mask"], self.device)  # from the CPU mask: no sync
        self.eng.begin_forward()
        hidden = last_hidden_states(self.model, ids, mask, plan=plan)
        ref_hidden = self.ref_hidden(ids, mask, batch["attention_mask"], plan)
        stack.enter_context(self.eng.head_gathered())
        head = lm_head_of(self.model)
        with self._ref_head():
            ref_kw = reference_head_inputs(self.ref, ref_hidden, self.device)
            if weights_fn is None:
                out = fused_linear_preference_loss(hidden, head.weight, labels, bias=head.bias, **ref_kw, **self.loss_kw,
                                                   sample_weights=weights, weights_fn=chunk_weights_fn,
                                                   host_labels=host_labels)
                return out, out, out.sample_weights
            with torch.no_grad():
                stats = fused_linear_preference_loss(hidden.detach(), head.weight, labels, bias=head.bias, **ref_kw,
                                                     **self.loss_kw, host_labels=host_labels)
            del ref_kw
        w = weights_fn(stats)
        ref_logps = None if stats.ref_chosen_logps is None else (stats.ref_chosen_logps, stats.ref_rejected_logps)
        out = fused_linear_preference_loss(hidden, head.weight, labels, bias=head.bias, ref_logps=ref_logps,
                                           sample_weights=w, **{**self.loss_kw, "compute_kl": False}, host_labels=host_labels)
        return out, stats, w

    @torch.no_grad()
    def ref_hidden(self, ids, mask, host_mask, plan) -> Optional[torch.Tensor]:
        """The reference's last hidden states on the training device (None without a reference)."""
        if self.ref is None:
            return None
        self._ref_begin_forward()
        return reference_hidden_states(self.ref, ids, mask, self.device, plan=plan, host_mask=host_mask)

    @torch.no_grad()
    def ref_logps(self, batch: dict) -> torch.Tensor:
        """``(2B,)`` reference log-probs (chosen then rejected) of a batch: the meta-update's
        validation batch carries them, so the meta-learner never touches the reference model."""
        ids, mask, labels = self._to_device(batch)
        rh = self.ref_hidden(ids, mask, batch["attention_mask"], None)
        with self._ref_head():
            r = reference_head_inputs(self.ref, rh, self.device)
            return fused_sequence_logps(rh, r["ref_weight"], labels, bias=r["ref_bias"], chunk_bytes=self.loss_kw["chunk_bytes"],
                                        backend=self.loss_kw["backend"])

    def margins(self, ds, collator, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Policy margins z (the loss's logit) and per-pair KL (zeros without one) for every pair of ``ds``."""
        s = self.pair_stats(ds, collator, ("margins", "kl"), batch_size)
        return s["margins"], s["kl"]

    @torch.no_grad()
    def pair_stats(self, ds, collator, fields, batch_size: int = 64) -> dict:
        """``{field: (N,) float64 array}`` for every pair of ``ds`` in eval mode: ``fields`` name
        per-pair tensors of :class:`PreferenceLossOutput` (``margins``, ``chosen_logps``, ...), and
        ``kl`` is the per-pair KL (zeros without one)."""
        out = {f: [] for f in fields}
        for s in range(0, len(ds), batch_size):
            batch = collator([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
            self.model.eval()
            with contextlib.ExitStack() as stack:
                _, stats, _ = self(batch, stack=stack)
            self.model.train()
            for f in fields:
                out[f].append((kl_or_zeros(stats) if f == "kl" else getattr(stats, f)).double().cpu())
        return {f: torch.cat(v).numpy() for f, v in out.items()}


def kl_or_zeros(stats: PreferenceLossOutput) -> torch.Tensor:
    """The per-pair KL, or zeros when the loss ran without reference hidden states."""
    return stats.kl if stats.kl is not None else torch.zeros_like(stats.margins)
