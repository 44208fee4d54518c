"""The bilevel meta-update of MetaPO (paper Sec. 3.4-3.5, Algorithm 1; docs/math.md section 5).

Every K steps, on a validation batch:

    L_meta = L_val + lambda * L_margin,  L_val = mean(sigma(-z)) (the paper's: mean(-log sigma(z))),  L_margin = -mean(z | z > 0)

depends on phi through the one-step lookahead ``theta'(phi) = theta - eta grad (1/B) sum_i w_phi(s_i) l_i``.
To first order in eta:

    dL_meta/dw_i = -(eta / B) <g_meta, g_i>,    dL_meta/dphi = sum_i dL_meta/dw_i * dw_phi(s_i)/dphi

with ``g_meta = grad_theta L_meta(theta)`` (one ordinary backward on the validation batch) and the B
scalars ``c_i = <g_meta, g_i>`` from ghost dot products (:mod:`metapo_fast.metapo.ghost`): no per-sample
gradients and no double backward, so it runs with SDPA/FlashAttention. The inner preconditioner is
the identity (plain gradients, SGD lookahead) by default; ``preconditioner="adam"`` uses Adam's
diagonal P instead (``c_i = <P g_meta, g_i>``, :func:`adam_preconditioned`). With Adam as inner
optimiser either is paired with the
meta-network's batch-mean weight normalisation (math.md section 4), which removes the lookahead's
preference for shrinking every weight.

Multi-process: ``g_meta`` is the gradient of the global validation objective (per-rank gradients
all-reduced, ``|P|`` of L_margin counted over all ranks), each rank computes ``c_i`` of its own
training pairs, and the phi gradient is all-reduced, so every rank applies the same update. Under
DeepSpeed ZeRO-3 the meta pass runs on the partitioned policy itself: ZeRO's hooks gather each
layer as in training, the LM head is gathered after the decoder forward, and both backwards use
``torch.autograd.grad`` (no ``p.grad``, so ZeRO's gradient hooks never fire and its accumulated
partitions of the step are untouched).

Memory: ``g_meta`` is the validation backward's own gradient tensors (not copied), so the meta
pass holds one model-sized set of gradients beyond the training step's (full, not partitioned,
under ZeRO-3 too), plus the activations of one validation / training micro-batch (gradient
checkpointing kept, see ``deterministic_mode``) and, under ZeRO-3, the gathered layers in flight;
the ghost backward writes no parameter gradient. Measured: ``tests/test_meta.py`` (one process),
``tests/test_distributed.py`` (2 ranks, ZeRO-3).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import all_reduce_sum, world_size
from ..losses import LOSSES, LossParams, PairBatch, get_loss, register_loss, sequence_coefficients
from ..models.hf import gathered, is_zero3_partitioned, last_hidden_states, lm_head_of, pack_plan, reference_head_inputs, reference_hidden_states
from ..ops.preference_loss import fused_linear_preference_loss
from .ghost import GhostCoverageError, GhostDots, head_ghost_dots
from .weight_net import MetaWeightNet

__all__ = ["MetaLearner", "adam_preconditioned", "meta_objective_losses", "pair_gradient_dots", "VAL_OBJECTIVES"]


VAL_OBJECTIVES = ("log", "sigmoid")


def meta_objective_losses(base: str, val_objective: str = "sigmoid") -> tuple[str, str]:
    """Register (once) and return the names of two losses over the base loss's logit z: L_val's
    terms, ``-log sigma(z)`` (``log``, the paper's) or ``sigma(-z)`` (``sigmoid``: the expected
    ranking error, a bounded, symmetric loss whose gradient vanishes on confidently misranked
    pairs, so mislabelled validation pairs do not dominate g_meta), and ``-z`` (L_margin's terms);
    the fused op then gives their gradients without materialising logits."""
    if val_objective not in VAL_OBJECTIVES:
        raise ValueError(f"val_objective must be one of {VAL_OBJECTIVES}, got {val_objective!r}")
    spec = get_loss(base)
    names = (f"_meta_val_{val_objective}[{base}]", f"_meta_margin[{base}]")
    if names[1] not in LOSSES:
        def margin(batch: PairBatch, p: LossParams, fn=spec.fn):
            z = fn(batch, p)[1]
            return -z, z

        register_loss(names[1], needs_reference=spec.needs_reference)(margin)
    if names[0] not in LOSSES:
        def val(batch: PairBatch, p: LossParams, fn=spec.fn, kind=val_objective):
            z = fn(batch, p)[1]
            return (-F.logsigmoid(z) if kind == "log" else torch.sigmoid(-z)), z

        register_loss(names[0], needs_reference=spec.needs_reference)(val)
    return names


class _BatchInputs:
    """A batch on the model's device: ids, mask, labels, the pack plan (varlen), the LM head and the
    fused loss's reference arguments. A batch may carry the reference log-probs it already has
    (``ref_logps``, ``(2B,)``): then the reference model is not run again."""

    def __init__(self, model, ref_model, batch, device):
        self.ids, self.mask, self.labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        self.plan = pack_plan(model, batch["attention_mask"], device)  # packed varlen: from the host mask, no sync
        self.head = lm_head_of(model)
        self.ref_kw = {}
        if batch.get("ref_logps") is not None:
            self.ref_kw = {"ref_logps": batch["ref_logps"].to(device)}
        elif ref_model is not None:
            rh = reference_hidden_states(ref_model, self.ids, self.mask, device, host_mask=batch["attention_mask"])
            self.ref_kw = reference_head_inputs(ref_model, rh, device)


def _first_trainable(model: nn.Module) -> Optional[torch.Tensor]:
    """The input embedding's weight when it is trained: every activation lies between it and the
    last hidden state, so a backward to it reaches every ghost hook."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.requires_grad else None


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a layer checkpoints with torch's reentrant variant (or one we cannot tell)."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True and m.training:
            kw = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None) or {}
            if kw.get("use_reentrant", True) is not False:
                return True
    return False


@contextlib.contextmanager
def _requires_grad_off(params: list):
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def deterministic_mode(model: nn.Module):
    """Dropout off (eval mode) while gradient checkpointing stays on: transformers checkpoints a
    layer only while that layer's ``training`` flag is set, so those layers keep it (they hold no
    dropout of their own; their submodules are in eval mode)."""
    was = model.training
    model.eval()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    try:
        yield
    finally:
        model.train(was)


def pair_gradient_dots(model: nn.Module, batch: dict, direction: dict, loss_type: str, params: LossParams,
                       ref_model: Optional[nn.Module] = None, backend: str = "auto",
                       before_forward: Callable[[], None] = lambda: None,
                       after_backward: Callable[[], None] = lambda: None) -> torch.Tensor:
    """``c_i = <G, grad_theta l_i>`` (float64, ``(B,)``) for the pairs of ``batch``, by ghost dot
    products over every parameter in ``direction``; raises :class:`GhostCoverageError` naming any
    parameter of ``direction`` that no formula covers. No ``p.grad`` is written. On a ZeRO-3
    policy the layers are gathered by ZeRO's hooks and the LM head here (after the decoder
    forward; its dots are taken before the backward, which may release a tied head);
    ``before_forward`` is called first and ``after_backward`` last (the trainer restarts ZeRO-3's
    fetch trace, then releases what the backward left gathered, as DeepSpeed's own backward does)."""
    device = next(model.parameters()).device
    ctx = _BatchInputs(model, ref_model, batch, device)
    n2, t = ctx.ids.shape
    bsz = n2 // 2
    plan = ctx.plan
    if plan is not None:  # packed varlen: the hooks see one row of the real tokens
        token_pair = (plan.row % bsz).unsqueeze(0)
    else:
        token_pair = (torch.arange(n2, device=device) % bsz).unsqueeze(1).expand(n2, t)
    names = {id(p): n for n, p in model.named_parameters()}
    head = ctx.head
    first = _first_trainable(model)
    # the backward goes to the first parameter only: it alone requires a gradient meanwhile, so no
    # layer computes weight gradients to discard (autograd Functions such as ZeRO-3's linear decide
    # from requires_grad, not from what the backward asks for: a model-sized waste of FLOPs)
    grad_path = first is not None and not _reentrant_checkpointing(model)
    if not grad_path and is_zero3_partitioned(model):  # refused before any forward
        raise RuntimeError("MetaLearner: the ghost pass on a ZeRO-3 policy needs a trained input embedding and "
                           "non-reentrant gradient checkpointing (a backward into p.grad would reach ZeRO's partitions)")
    frozen = [p for p in model.parameters() if p.requires_grad and p is not first] if grad_path else []
    before_forward()
    with GhostDots(model, direction, token_pair, bsz, exclude=(head,)) as gd, _requires_grad_off(frozen):
        hidden = last_hidden_states(model, ctx.ids, ctx.mask, plan=plan)
        h_leaf = hidden.detach().requires_grad_()
        with gathered(head.parameters()):
            weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
            out = fused_linear_preference_loss(h_leaf, weight, ctx.labels, bias=bias, **ctx.ref_kw, loss_type=loss_type,
                                               **params.kwargs(),
                                               sample_weights=torch.full((bsz,), float(bsz), device=device),  # L = sum_i l_i
                                               compute_kl=False, backend=backend)
            c_head = None
            if head.weight in direction:
                lp, cnt = (torch.cat([a, b]).double() for a, b in ((out.chosen_logps, out.rejected_logps),
                                                                     (out.chosen_counts, out.rejected_counts)))
                ref = None if out.ref_chosen_logps is None else torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]).double()
                coef = sequence_coefficients(get_loss(loss_type), params, lp, cnt, ref)[3]  # dl_i / dlogp_s
                c_head = head_ghost_dots(hidden.detach(), weight, bias, ctx.labels, coef, direction[head.weight],
                                         direction.get(head.bias) if head.bias is not None else None, bsz, backend=backend,
                                         # the host's labels: prompt/padding rows dropped on CUDA too, no sync
                                         host_labels=batch["labels"] if batch["labels"].device.type == "cpu" else None)
            (g_h,) = torch.autograd.grad(out.loss, h_leaf)
        # the hooks need the activations' gradients only: back to the first layer, and no parameter
        # gradient is written (hidden.backward would fill every p.grad, only for it to be discarded)
        if grad_path:  # reentrant checkpoints refuse autograd.grad
            torch.autograd.grad(hidden, [first], g_h, allow_unused=True)
            after_backward()
        else:
            saved = [p.grad for p in model.parameters()]
            hidden.backward(g_h)
            for p, g in zip(model.parameters(), saved):  # the hooks' backward must not leak into the training step
                p.grad = g
    missing = [names.get(id(p), "?") for p in gd.uncovered(direction) if p is not head.weight and p is not head.bias]
    if missing:
        raise GhostCoverageError(f"no ghost formula covers these parameters: {missing}")
    return gd.c if c_head is None else gd.c + c_head


def adam_preconditioned(direction: dict, optimizer: torch.optim.Optimizer, inplace: bool = False) -> dict:
    """``{p: g / (sqrt(v_hat) + eps)}``: the direction under the diagonal preconditioner of an Adam /
    AdamW ``optimizer`` (its bias-corrected second moment ``v_hat = exp_avg_sq / (1 - beta2^t)`` and
    its eps), so that ghost dots give ``c_i = <g_meta, P g_i>``, the lookahead of the step Adam takes
    (its momentum and the dependence of v on g_i left out; docs/math.md section 5a). A parameter
    without optimiser state yet (before the first step) keeps ``P = 1``. ``inplace``: the direction's
    tensors are divided in place (no model-sized copy); otherwise new tensors are returned."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for p, g in direction.items():
        grp, st = groups.get(id(p)), optimizer.state.get(p, {})
        if grp is None or "exp_avg_sq" not in st:
            out[p] = g
            continue
        beta2, eps, step = grp["betas"][1], grp["eps"], st["step"]
        # the step count may live on the device (fused / capturable Adam): tensor arithmetic, no host read
        bc2 = 1.0 - beta2 ** (step.to(device=g.device, dtype=g.dtype) if torch.is_tensor(step) else float(step))
        denom = st["exp_avg_sq"].to(g.dtype).div(bc2).sqrt_().add_(eps)
        out[p] = g.div_(denom) if inplace else g / denom
    return out


class MetaLearner:
    """Owns the meta-network's optimiser and performs the meta-update.

    The optimiser steps on ``dL_meta/dphi / eta``, the meta-gradient per unit of the lookahead's
    step size: eta is a positive constant factor of the first-order gradient, and dividing it out
    makes ``lr`` independent of the policy's learning rate (at the paper's eta = 5e-7 the raw
    gradient is ~1e-10, under Adam's eps of 1e-8, so phi would not move). ``phi_gradient`` itself
    stays the exact first-order derivative (tested against double backward).

    Args:
        net: the :class:`MetaWeightNet`.
        lr: learning rate on phi. Default 0.003: docs/math.md section 4 measured that the
            paper's 1e-4 leaves phi unchanged (the weights stay at 1); 0.003 learns and beat
            0.03 in every condition of the quality benchmark.
        optimizer: ``"adam"`` (per coordinate, the paper's) or ``"sgd"``: SGD with momentum 0.9 on
            the L2-normalised gradient, so each update adds ``lr`` times a unit vector along the
            meta-gradient to the momentum (steady-state steps of up to 10 lr) and a feature whose
            coordinate carries little of it moves little (Adam gives every
            coordinate a full-size step, noise included).
        interval: K, steps between meta-updates (the trainer calls :meth:`step` at the steps
            :meth:`due` names).
        start_step: no meta-update before this optimiser step (0 = from the first multiple of K):
            phi keeps its initialisation (every weight 1) until then, so the first updates see
            margins that already carry the signal (docs/math.md section 5a).
        lambda_margin: lambda of L_meta (paper: 0.1).
        val_objective: L_val's per-pair loss: ``sigmoid`` (``sigma(-z)``, bounded; the default, see
            docs/math.md section 5a) or ``log`` (``-log sigma(z)``, the paper's); see
            :func:`meta_objective_losses`.
        entropy_coef: weight of ``-H(w / sum w)`` added to the phi objective (paper Table 15; 0 = off).
        inner_lr: eta of the lookahead (the policy's learning rate).
        loss_type, loss_params: the training loss (its logit is the margin of L_meta).
        preconditioner: the lookahead's inner preconditioner P in ``c_i = <g_meta, P g_i>``:
            ``"none"`` (P = 1, an SGD step) or ``"adam"`` (the diagonal of :attr:`inner_optimizer`,
            an Adam/AdamW over the model's parameters, see :func:`adam_preconditioned`; the caller
            sets ``inner_optimizer`` before the first :meth:`step`).
    """

    def __init__(self, net: MetaWeightNet, lr: float = 0.003, interval: int = 100, lambda_margin: float = 0.1,
                 entropy_coef: float = 0.0, inner_lr: float = 1e-6, loss_type: str = "sigmoid",
                 loss_params: Optional[LossParams] = None, backend: str = "auto", optimizer: str = "adam",
                 val_objective: str = "sigmoid", preconditioner: str = "none",
                 inner_optimizer: Optional[torch.optim.Optimizer] = None, start_step: int = 0):
        if interval < 1:
            raise ValueError(f"MetaLearner: interval (K) must be >= 1, got {interval}")
        if start_step < 0:
            raise ValueError(f"MetaLearner: start_step must be >= 0, got {start_step}")
        if lr <= 0 or inner_lr <= 0:
            raise ValueError(f"MetaLearner: lr and inner_lr must be > 0, got {lr}, {inner_lr}")
        self.net, self.interval, self.lambda_margin = net, interval, lambda_margin
        self.start_step = start_step
        self.entropy_coef, self.inner_lr, self.backend = entropy_coef, inner_lr, backend
        self.loss_type, self.params = loss_type, loss_params or LossParams()
        if optimizer == "adam":
            self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        elif optimizer == "sgd":
            self.opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        else:
            raise ValueError(f"MetaLearner: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if val_objective not in VAL_OBJECTIVES:
            raise ValueError(f"MetaLearner: val_objective must be one of {VAL_OBJECTIVES}, got {val_objective!r}")
        self.optimizer, self.val_objective = optimizer, val_objective
        if preconditioner not in ("none", "adam"):
            raise ValueError(f"MetaLearner: preconditioner must be 'none' or 'adam', got {preconditioner!r}")
        self.preconditioner, self.inner_optimizer = preconditioner, inner_optimizer
        self.updates = 0
        # called before each of the meta pass's forwards and after each of its backwards: under ZeRO-3
        # the trainer restarts the fetch trace, then releases what the backward left gathered
        self.before_forward: Callable[[], None] = lambda: None
        self.after_backward: Callable[[], None] = lambda: None

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` (1-based) ends with a meta-update: every K-th step from
        ``start_step`` on."""
        return step >= self.start_step and step % self.interval == 0

    # -- the meta-gradient direction ------------------------------------------------------------
    def meta_gradient(self, model: nn.Module, val_batch: dict, ref_model=None) -> tuple[dict, dict]:
        """``{param: grad L_meta}`` on the (global) validation batch, and diagnostics.

        The gradients come from ``torch.autograd.grad`` (no ``p.grad`` written, no gradient hook of
        DeepSpeed fired), so this runs on a ZeRO-3-partitioned policy too: its layers are gathered
        by ZeRO's own hooks, the LM head (which the fused loss reads directly) is gathered here
        after the decoder forward, and ZeRO's accumulated gradient partitions are not touched. The
        result holds the full gradient of every parameter: the meta pass's one model-sized set."""
        device = next(model.parameters()).device
        ctx = _BatchInputs(model, ref_model, val_batch, device)
        val_name, margin_name = meta_objective_losses(self.loss_type, self.val_objective)
        kw = dict(**self.params.kwargs(), compute_kl=False, backend=self.backend)
        params = [p for p in model.parameters() if p.requires_grad]
        reentrant = _reentrant_checkpointing(model)
        if reentrant and is_zero3_partitioned(model):
            raise RuntimeError("MetaLearner: reentrant gradient checkpointing on a ZeRO-3 policy; enable it with "
                               "gradient_checkpointing_kwargs={'use_reentrant': False} (the trainer does)")
        self.before_forward()
        hidden = last_hidden_states(model, ctx.ids, ctx.mask, plan=ctx.plan)
        b_local = hidden.shape[0] // 2
        world = world_size()
        with gathered(ctx.head.parameters()):  # ZeRO-3: the head, after the decoder forward, through the backward
            # L_val = mean over the global batch of sigma(-z) or -log sigma(z): each rank's mean, averaged over ranks
            val = fused_linear_preference_loss(hidden, ctx.head.weight, ctx.labels, bias=ctx.head.bias, **ctx.ref_kw,
                                               loss_type=val_name, **kw)
            z = val.margins
            pos = (z > 0).to(hidden.dtype)
            n_pos = pos.sum()
            all_reduce_sum(n_pos)
            # lambda * L_margin = -(lambda/|P|) sum_{z>0} z over all ranks: per rank a weighted fused loss
            # (1/b_local) sum_i w_i (-z_i) with w_i = lambda * b_local / |P| on positive pairs (rank grads are summed)
            w_margin = pos * (b_local / n_pos.clamp(min=1)) * self.lambda_margin
            ref_logps = None if val.ref_chosen_logps is None else (val.ref_chosen_logps, val.ref_rejected_logps)
            margin = fused_linear_preference_loss(hidden, ctx.head.weight, ctx.labels, bias=ctx.head.bias, ref_logps=ref_logps,
                                                  sample_weights=w_margin, loss_type=margin_name, **kw)
            total = val.loss / world + margin.loss
            if reentrant:  # torch's reentrant checkpoint refuses autograd.grad: p.grad, taken as G (no clone)
                saved = [p.grad for p in params]
                for p in params:
                    p.grad = None
                total.backward()
                grads = [p.grad for p in params]
                for p, g in zip(params, saved):
                    p.grad = g
            else:
                grads = torch.autograd.grad(total, params, allow_unused=True)
                self.after_backward()  # ZeRO-3: the leftovers released while a tied head is still gathered here
        G = {p: g.detach() for p, g in zip(params, grads) if g is not None}
        for g in G.values():
            all_reduce_sum(g)
        l_margin = all_reduce_sum(-(z * pos).sum())
        return G, {"L_val": val.loss.detach(), "L_margin": l_margin / n_pos.clamp(min=1), "val_accuracy": (z > 0).float().mean()}

    # -- one meta-update ------------------------------------------------------------------------
    def step(self, model: nn.Module, train_batches, val_batch: dict, features: torch.Tensor,
             ref_model: Optional[nn.Module] = None) -> dict:
        """Update phi from the training batches (a batch dict or a list of them: the micro-batches of
        one optimiser step) whose tracker features are ``features (B, 6)`` (concatenated in order)."""
        t0 = time.perf_counter()
        out = self.phi_gradient(model, train_batches, val_batch, features, ref_model, per_unit_eta=True)
        params = [p for p in self.net.parameters() if p.grad is not None]
        if self.optimizer == "sgd":
            norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params))
            for p in params:
                p.grad.div_(norm.clamp(min=1e-30).to(p.grad.dtype))
        self.opt.step()
        self.updates += 1
        out["meta_time_s"] = time.perf_counter() - t0
        return out

    def phi_gradient(self, model: nn.Module, train_batches, val_batch: dict, features: torch.Tensor,
                     ref_model: Optional[nn.Module] = None, per_unit_eta: bool = False) -> dict:
        """Set ``p.grad`` of the meta-network's parameters to ``dL_meta/dphi`` (first order in eta),
        the lookahead being one step on all of ``train_batches`` (a batch or a list of micro-batches).

        With ``batch_mean`` the weights are normalised over all the rows of every rank together,
        as the training step does (its whole optimiser batch, every micro-batch and rank).
        ``per_unit_eta``: the lookahead term divided by eta (what :meth:`step` optimises; the
        entropy term is not scaled)."""
        batches = [train_batches] if isinstance(train_batches, dict) else list(train_batches)
        if self.preconditioner == "adam" and self.inner_optimizer is None:
            raise RuntimeError("MetaLearner: preconditioner='adam' needs inner_optimizer (the policy's Adam/AdamW) to be set")
        with deterministic_mode(model):  # no dropout: the lookahead is about the deterministic gradient
            G, diag = self.meta_gradient(model, val_batch, ref_model)
            if self.preconditioner == "adam":  # c_i = <g_meta, P g_i> = <P g_meta, g_i> (P diagonal): G scaled in place
                G = adam_preconditioned(G, self.inner_optimizer, inplace=True)
            c = torch.cat([pair_gradient_dots(model, b, G, self.loss_type, self.params, ref_model, self.backend,
                                              before_forward=self.before_forward, after_backward=self.after_backward)
                           for b in batches])
        if features.shape[0] != c.shape[0]:
            raise ValueError(f"MetaLearner: {features.shape[0]} feature rows for {c.shape[0]} training pairs")
        b_global = c.shape[0] * world_size()
        dl_dw = (-(1.0 if per_unit_eta else self.inner_lr) / b_global) * c  # dL_meta/dw_i (per unit eta if asked)
        self.opt.zero_grad(set_to_none=True)
        w = self.net(features)
        obj = (dl_dw.to(w.dtype).detach() * w).sum()
        if self.entropy_coef:
            q = w / w.sum()
            obj = obj + self.entropy_coef * (q * q.clamp(min=1e-12).log()).sum()  # -H(q)
        obj.backward()
        for p in self.net.parameters():
            if p.grad is not None:
                all_reduce_sum(p.grad)
        out = {k: float(v) for k, v in diag.items()}
        out.update(c_abs_mean=float(c.abs().mean()),
                   weight_mean=float(w.detach().mean()), weight_std=float(w.detach().std(unbiased=False)))
        return out

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.opt.state_dict(), "updates": self.updates,
                "start_step": self.start_step}

    def load_state_dict(self, sd: dict) -> None:
        """The saved state; the saved ``start_step`` too (a resumed run keeps the schedule it started
        with even when its length changes; a state saved before it existed keeps the current one)."""
        self.net.load_state_dict(sd["net"])
        self.opt.load_state_dict(sd["optimizer"])
        self.updates = int(sd["updates"])
        self.start_step = int(sd.get("start_step", self.start_step))
