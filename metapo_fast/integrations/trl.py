"""MetaPO for TRL users: ``MetaPOTrainer`` is a TRL ``DPOTrainer`` whose loss is metapo_fast's fused
linear preference loss (no logits materialised), with the temporal tracker and the meta-learned
pair weights. ``pip install metapo-fast[trl]``.

    from metapo_fast.integrations.trl import MetaPOTrainer, MetaPOTRLConfig
    args = MetaPOTRLConfig(output_dir="out", beta=0.1, metapo_interval=100)
    trainer = MetaPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()

It accepts every ``DPOConfig`` field plus the ``metapo_*`` fields below and TRL's dataset formats
(TRL tokenises them). Only one hook is overridden, ``_compute_loss``, TRL's loss computation; pair
identity is carried through TRL's data pipeline by an index column (``metapo_pair_id``, added
before TRL processes the data) that the signature filter keeps and the collator forwards.
Logged metrics: TRL's names (loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected) plus metapo/weight_mean, metapo/weight_std,
metapo/kl and the meta coefficients. Loss types: TRL's ``sigmoid`` and ``ipo`` map to ours; others
are rejected at start-up.

Several ranks: the tracker is shared (one all-gather per micro-batch), the weights' batch mean and
phi's gradient span every rank. Under DeepSpeed ZeRO-3 the LM heads (policy and reference), which
the fused loss reads directly, are gathered after the decoder forwards and the policy head stays
gathered through the backward (so its gradient reaches ZeRO's partitions); the meta-update runs on
the partitioned policy itself (layers gathered by ZeRO's hooks, gradients by ``autograd.grad``, so
ZeRO's accumulated partitions are untouched; one model-sized set of meta-gradients per rank).
Tested on CPU: one process, and 2 ranks under ZeRO-3 (gloo) against one process
(``tests/test_integrations.py``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # TRL is an optional extra
    raise ImportError("metapo_fast.integrations.trl needs TRL: pip install 'metapo-fast[trl]'") from exc

from ..ops.chunking import DEFAULT_CHUNK_BYTES
from ..ops.preference_loss import fused_linear_preference_loss
from ..losses import LossParams
from ..metapo.bilevel import MetaLearner
from ..metapo.weight_net import MetaWeightNet
from ..models.hf import (gathered, release_zero3_leftovers, reset_zero3_trace, last_hidden_states, lm_head_of, reference_head_inputs,
                         reference_hidden_states)
from ..metapo.tracker import TemporalTracker

__all__ = ["MetaPOTRLConfig", "MetaPOTrainer", "PAIR_ID_COLUMN"]

PAIR_ID_COLUMN = "metapo_pair_id"
_LOSS_MAP = {"sigmoid": "sigmoid", "ipo": "ipo"}


@dataclass
class MetaPOTRLConfig(DPOConfig):
    """``DPOConfig`` plus MetaPO's settings (docs/math.md sections 3-5)."""

    metapo_enabled: bool = field(default=True, metadata={"help": "Learn per-pair weights (MetaPO); false = fused DPO."})
    metapo_alpha: float = field(default=0.9, metadata={"help": "EMA decay of the temporal features, in (0, 1)."})
    metapo_interval: int = field(default=100, metadata={"help": "K: a meta-update every K training steps."})
    metapo_start_fraction: float = field(default=1 / 3, metadata={"help": "No meta-update before this fraction of the run's steps (0 = from step K, the paper's); every weight stays 1 until then (the trainer's default, see its meta.start_fraction)."})
    metapo_lambda_margin: float = field(default=0.1, metadata={"help": "lambda of L_meta = L_val + lambda L_margin."})
    metapo_lr: float = field(default=0.003, metadata={"help": "Adam lr of the meta-network (the paper's 1e-4 does not move it; 0.003 is the trainer's default, see quality.md)."})
    metapo_val_objective: str = field(default="sigmoid", metadata={"help": "L_val's per-pair loss: sigmoid (sigma(-z), bounded; the trainer's default) or log (-log sigma(z), the paper's)."})
    metapo_features: str = field(default="all", metadata={"help": "Feature subset: all, no_margin, no_volatility, no_reference, no_temporal."})
    metapo_arch: str = field(default="linear", metadata={"help": "linear (7 parameters) or mlp (6-32-1)."})
    metapo_val_fraction: float = field(default=0.03, metadata={"help": "Share of the train set held out for L_meta when no meta_val_dataset is given."})
    metapo_val_batch_size: int = field(default=16, metadata={"help": "Validation pairs per meta-update."})
    metapo_backend: str = field(default="auto", metadata={"help": "Fused-loss / tracker implementation: auto, torch, triton, cpp."})
    metapo_chunk_bytes: int = field(default=DEFAULT_CHUNK_BYTES, metadata={"help": "Logits memory budget per chunk of the fused loss."})


class _PairIdCollator:
    """Wraps TRL's collator and forwards the pair-id column as ``pair_ids (B,)``."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner(examples)
        if examples and PAIR_ID_COLUMN in examples[0]:
            batch["pair_ids"] = torch.tensor([int(e[PAIR_ID_COLUMN]) for e in examples], dtype=torch.long)
        return batch


def shifted_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """TRL's (input_ids, completion_mask) -> our labels: ``labels[:, t] = input_ids[:, t+1]`` where token
    t+1 is a completion token, -100 elsewhere (so ``hidden[:, t]`` predicts ``labels[:, t]``)."""
    nxt = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    return torch.cat([nxt, torch.full_like(input_ids[:, :1], -100)], 1)


class MetaPOTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` with metapo_fast's fused loss, tracker and meta-updates."""

    def __init__(self, model, ref_model=None, args: Optional[MetaPOTRLConfig] = None, train_dataset=None,
                 meta_val_dataset=None, **kwargs):
        if args is None:
            raise ValueError("MetaPOTrainer needs args=MetaPOTRLConfig(...)")
        if not isinstance(args, MetaPOTRLConfig):
            raise ValueError(f"args must be a MetaPOTRLConfig (DPOConfig + metapo_* fields), got {type(args).__name__}")
        bad = [t for t in (args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]) if t not in _LOSS_MAP]
        if bad:
            raise ValueError(f"MetaPOTrainer supports loss_type in {sorted(_LOSS_MAP)}, got {bad}")
        if train_dataset is None:
            raise ValueError("MetaPOTrainer needs a train_dataset")
        if args.metapo_enabled and meta_val_dataset is None:
            split = train_dataset.train_test_split(test_size=args.metapo_val_fraction, seed=args.seed, shuffle=True)
            train_dataset, meta_val_dataset = split["train"], split["test"]
        train_dataset = train_dataset.add_column(PAIR_ID_COLUMN, list(range(len(train_dataset))))
        super().__init__(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset, **kwargs)
        self.data_collator = _PairIdCollator(self.data_collator)
        dev = self.accelerator.device
        self.metapo_tracker = TemporalTracker(len(train_dataset), alpha=args.metapo_alpha, device=dev, backend=args.metapo_backend)
        self.metapo_net = self.metapo_learner = self._meta_val = None
        if args.metapo_enabled:
            if not 0.0 <= args.metapo_start_fraction < 1.0:
                raise ValueError(f"metapo_start_fraction must be in [0, 1), got {args.metapo_start_fraction}")
            normalize = "batch_mean" if "adam" in str(args.optim).lower() else "none"
            self.metapo_net = MetaWeightNet(args.metapo_arch, args.metapo_features, normalize).to(dev)
            self.metapo_learner = MetaLearner(self.metapo_net, lr=args.metapo_lr, interval=args.metapo_interval,
                                              lambda_margin=args.metapo_lambda_margin, inner_lr=args.learning_rate,
                                              loss_type=self._metapo_loss(), loss_params=self._metapo_params(),
                                              backend=args.metapo_backend, val_objective=args.metapo_val_objective)
            self._meta_val = self._prepare_dataset(meta_val_dataset, self.processing_class, args, "meta_val")
        self._meta_cursor = 0
        self._metapo_last_batch = None
        self._metapo_stack: Optional[contextlib.ExitStack] = None  # open through training_step's backward
        self._metapo_pending = {"train": [], "eval": []}  # per micro-batch metric vectors, on the device

    _METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected", "metapo/weight_mean", "metapo/weight_std", "metapo/kl")

    def log(self, logs: dict, start_time=None) -> None:
        """TRL's log, after moving the metrics gathered on the device since the last log into TRL's
        lists: one host read per log instead of several per micro-batch."""
        mode = "train" if self.model.training else "eval"
        pending, self._metapo_pending[mode] = self._metapo_pending[mode], []
        by_len: dict[int, list] = {}
        for v in pending:
            by_len.setdefault(v.numel(), []).append(v)
        for vs in by_len.values():
            for row in torch.stack(vs).cpu().tolist():  # the one host read
                for name, x in zip(self._METRIC_NAMES, row):
                    self._metrics[mode][name].append(x)
        super().log(logs, start_time)

    def _metapo_loss(self) -> str:
        lt = self.args.loss_type
        return _LOSS_MAP[lt[0] if isinstance(lt, list) else lt]

    def _metapo_params(self) -> LossParams:
        return LossParams(beta=self.beta, label_smoothing=self.args.label_smoothing)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PAIR_ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PAIR_ID_COLUMN]

    def _fused(self, hidden, head, labels, **kw):
        a = self.args
        return fused_linear_preference_loss(hidden, head.weight, labels, bias=head.bias, loss_type=self._metapo_loss(),
                                            **self._metapo_params().kwargs(), backend=a.metapo_backend,
                                            chunk_bytes=a.metapo_chunk_bytes, **kw)

    def _gathered(self, *modules):
        """The LM heads of ``modules`` with their full weights (ZeRO-3: gathered on every rank, a
        collective; otherwise a null context). The fused loss reads a head's weight directly."""
        return gathered(p for m in modules if m is not None for p in lm_head_of(m).parameters())

    def _compute_loss(self, model, inputs, return_outputs):
        with contextlib.ExitStack() as local:  # closed here outside training_step (evaluation: no backward)
            return self._compute_loss_in(model, inputs, return_outputs, self._metapo_stack or local)

    def _compute_loss_in(self, model, inputs, return_outputs, stack: contextlib.ExitStack):
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = shifted_labels(ids, inputs["completion_mask"])
        hidden = last_hidden_states(unwrapped, ids, mask)
        ref = None
        if self.precompute_ref_logps:
            ref_kw = {"ref_logps": (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])}
        else:
            ref = self.ref_model
            if ref is None:
                raise ValueError("MetaPOTrainer needs ref_model (or precompute_ref_log_probs=True)")
            rh = reference_hidden_states(ref, ids, mask, ids.device)
        # ZeRO-3: the heads after both decoder forwards (a tied embedding's hook would release them);
        # the policy's stays gathered on ``stack`` through the backward
        stack.enter_context(self._gathered(unwrapped, ref))
        head = lm_head_of(unwrapped)
        if ref is not None:
            ref_kw = reference_head_inputs(ref, rh, ids.device)
        pair_ids = inputs.get("pair_ids")
        if mode == "train" and self.metapo_net is not None and pair_ids is not None:
            with torch.no_grad():
                stats = self._fused(hidden.detach(), head, labels, **ref_kw)
            kl = stats.kl if stats.kl is not None else torch.zeros_like(stats.margins)
            feats = self.metapo_tracker.update(pair_ids.to(hidden.device), stats.margins, kl)
            w = self.metapo_net(feats, update_stats=True).detach()
            out = self._fused(hidden, head, labels, ref_logps=(stats.ref_chosen_logps, stats.ref_rejected_logps),
                              sample_weights=w, compute_kl=False)
            last = {k: v for k, v in inputs.items()}
            if stats.ref_chosen_logps is not None:  # the ghost pass reuses them (no reference pass)
                last["ref_logps"] = torch.cat([stats.ref_chosen_logps, stats.ref_rejected_logps]).detach()
            self._metapo_last_batch = (last, labels, feats)
        else:
            out = stats = self._fused(hidden, head, labels, **ref_kw)
            w = torch.ones_like(out.margins)
            if mode == "train" and pair_ids is not None:
                kl = stats.kl if stats.kl is not None else torch.zeros_like(stats.margins)
                self.metapo_tracker.update(pair_ids.to(hidden.device), stats.margins, kl)
        # TRL's metrics, kept on the device: one all-gather per micro-batch (sums and the pair count of
        # every rank) and no host read; log() reads everything since the last log in one transfer
        parts = [stats.chosen_rewards, stats.rejected_rewards, stats.accuracies, stats.margins, stats.chosen_logps,
                 stats.rejected_logps]
        sums = torch.stack([t.detach().float().sum() for t in parts] + [torch.ones_like(stats.margins).sum()])
        sums = self.accelerator.gather(sums.reshape(1, -1)).reshape(-1, len(parts) + 1).sum(0)
        local = [w.mean(), w.std(unbiased=False)] + ([stats.kl.mean()] if stats.kl is not None else [])
        self._metapo_pending[mode].append(torch.cat([sums[:-1] / sums[-1], torch.stack(local).detach().float()]))
        return (out.loss, {"margins": out.margins}) if return_outputs else out.loss

    def training_step(self, model, inputs, *args, **kwargs):
        with contextlib.ExitStack() as stack:  # what _compute_loss gathers stays so through the backward
            self._metapo_stack = stack
            try:
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                self._metapo_stack = None
        step = self.state.global_step + 1  # the step this micro-batch belongs to
        if self.metapo_learner is not None:  # the run's length is known once training has started
            self.metapo_learner.start_step = round(self.args.metapo_start_fraction * self.state.max_steps)
        if (self.metapo_learner is not None and self._metapo_last_batch is not None and self.metapo_learner.due(step)
                and self.accelerator.gradient_state.sync_gradients):
            self._meta_update(model)
        return loss

    def _meta_update(self, model) -> None:
        unwrapped = self.accelerator.unwrap_model(model)
        inputs, _, feats = self._metapo_last_batch
        n = len(self._meta_val)
        k = min(self.args.metapo_val_batch_size, n)
        val_items = [self._meta_val[(self._meta_cursor + i) % n] for i in range(k)]
        self._meta_cursor = (self._meta_cursor + k) % n
        val = self.data_collator(val_items)
        dev = self.accelerator.device

        def to_batch(b):
            out = {"input_ids": b["input_ids"].to(dev), "attention_mask": b["attention_mask"].to(dev),
                   "labels": shifted_labels(b["input_ids"], b["completion_mask"]).to(dev)}
            if b.get("ref_logps") is not None:
                out["ref_logps"] = b["ref_logps"]
            return out

        # on the policy itself, ZeRO-3-partitioned or not: the meta pass writes no p.grad (the step's accumulated
        # gradients, ZeRO's partitions included, stay as they are); under ZeRO-3 its decoder forwards restart the
        # fetch trace and its backwards release what they left gathered, as the engine's own would (no-ops otherwise)
        engine = getattr(self, "deepspeed", None)
        self.metapo_learner.before_forward = lambda: reset_zero3_trace(engine)
        self.metapo_learner.after_backward = lambda: release_zero3_leftovers(engine)
        with self._gathered(self.ref_model):  # the validation batch's reference pass reads its head (ZeRO-3)
            diag = self.metapo_learner.step(unwrapped, to_batch(inputs), to_batch(val), feats, ref_model=self.ref_model)
        m = self._metrics["train"]
        for name, v in self.metapo_net.coefficients().items() if self.metapo_net.arch == "linear" else []:
            m[f"metapo/coef/{name}"].append(v)
        m["metapo/L_val"].append(diag["L_val"])
