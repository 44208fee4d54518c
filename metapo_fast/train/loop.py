"""The MetaPO training loop (paper Algorithm 1; docs/math.md): tracker -> weights -> fused loss ->
backward -> step, a meta-update every K steps, evaluation every E steps, crash-safe checkpoints.

One optimiser step:
  for each micro-batch:  policy and reference hidden states -> (MetaPO) a no-grad pass of the fused
  loss gives this step's margins z and KL -> the tracker updates each pair's history in place and
  returns its features s -> w = w_phi(s) -> the fused loss with weights w -> backward.
  Then clip, skip the step if anything is non-finite, optimiser and scheduler step.
Weights depend on this step's margins, so the LM head's policy logits are computed twice on the
MetaPO path (10NHV instead of the fused loss's 8NHV floor); plain DPO/FocalPO/SimPO runs take the
single pass.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from typing import Optional

import numpy as np
import torch

from . import setup as B
from ..files import atomic_write_text
from .state import CheckpointManager
from ..config import MetaPOConfig, check_resume_compatible, config_fingerprint, save_yaml
from ..data.batches import PairSampler
from ..comm import barrier
from .parallel import DistInfo
from .parallel import PlainEngine
from .outputs import auroc, sigmoid, spearman, write_pair_table
from ..ops.preference_loss import fused_linear_preference_loss, fused_sequence_logps
from ..losses import get_loss
from ..metapo.weight_net import MetaWeightNet
from ..models.hf import compute_device, last_hidden_states, lm_head_of, pack_plan
from .outputs import make_logger
from ..metapo.tracker import TemporalTracker

__all__ = ["Trainer", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    pass


def _lr_lambda(total: int, warmup: int, kind: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * prog)) if kind == "cosine" else 1.0 - prog
    return f


class Trainer:
    def __init__(self, cfg: MetaPOConfig, dist: DistInfo):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        t = cfg.train
        self.run_dir = t.output_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self._seed(t.seed)
        self.spec = get_loss(cfg.loss.loss_type)
        self.tok, self.model = B.build_tokenizer_and_model(cfg, self.device)
        task = None
        if cfg.data.path is None:
            from ..data.synthetic import make_synthetic_task

            s = cfg.data.synthetic
            task = make_synthetic_task(s.num_pairs, s.flip_fraction, s.ambiguous_fraction, s.seed, s.num_eval_pairs)
        self.resume_path = self._find_resume()
        ref_dir = os.path.join(self.run_dir, "reference")
        if task is not None and t.sft_warmup_steps and self.resume_path is None:
            B.sft_warmup(self.model, self.tok, task.sft_rows, t.sft_warmup_steps, t.sft_lr, t.seed, self.device)
        elif task is not None and t.sft_warmup_steps:  # resumed: the warmed-up start was saved
            self._load_weights(self.model, ref_dir)
        self.ref = B.make_reference(self.model, cfg, self.device)
        self._ref_head = contextlib.nullcontext  # gathers the reference head where it is sharded (ZeRO-3)
        self._ref_begin_forward = lambda: None  # (ZeRO-3) resets the sharded reference's fetch trace
        self.ref_placement = "none" if self.ref is None else ("cpu" if cfg.model.ref_offload_cpu else "device")
        if self.ref is not None and cfg.model.ref_offload_cpu and self.device.type != "cpu" and not self._zero3_planned():
            from ..models.offload import stream_reference

            self._ref_streams = stream_reference(self.ref, self.device)  # host-resident, streamed per block
            self.ref_placement = "cpu, streamed per block"
        if self.dist.is_main and task is not None and t.sft_warmup_steps and self.resume_path is None:
            self.model.save_pretrained(ref_dir)  # the run's reference, needed to resume exactly
        self.data = B.build_data(cfg, self.tok, self.ref, self.device, task)
        n = len(self.data.train)
        self.tracker = TemporalTracker(n, alpha=cfg.tracker.alpha, device=self.device)
        # (margin, KL) of each pair's last visit: with the tracker's history these give the exact
        # features the meta-network saw, for the pair-weights table (8 more bytes per pair).
        self.last_seen = torch.zeros(n, 2, dtype=torch.float32, device=self.device)
        m = cfg.meta
        self.meta_net = MetaWeightNet(m.arch, m.features, cfg.meta_normalize, m.mlp_hidden, m.stats_momentum).to(self.device) if m.enabled else None
        self.meta = self._make_meta_learner() if m.enabled else None
        self.sampler = PairSampler(n, t.per_device_batch_size, dist.world_size, dist.rank, seed=t.seed)
        self.grad_accum = t.resolved_grad_accum(dist.world_size)
        steps_per_epoch = self.sampler.batches_per_epoch // self.grad_accum
        self.total_steps = t.max_steps if t.max_steps is not None else steps_per_epoch * t.epochs
        lr_fn = _lr_lambda(self.total_steps, int(t.warmup_ratio * self.total_steps), t.lr_scheduler)
        self.meta_replica = None
        if self._uses_deepspeed():
            self.eng = self._deepspeed_engine(lr_fn)
            self.model = self.eng.module
            if self.ref is not None and self.eng.zero3:  # the reference is sharded like the policy
                from .parallel import ShardedReference

                sharded = ShardedReference(self.ref, self._ds_cfg, cfg.model.ref_offload_cpu)
                self.ref, self._ref_head, self._ref_begin_forward = sharded.module, sharded.head, sharded.begin_forward
                self.ref_placement = "zero3" + ("+offload_param" if cfg.model.ref_offload_cpu else "")
        else:
            opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.SGD
            kw = {"weight_decay": t.weight_decay} if t.optimizer == "adamw" else {}
            opt = opt_cls(self.model.parameters(), lr=t.lr, **kw)
            self.eng = PlainEngine(self.model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_fn), t.max_grad_norm)
        self.ckpt = CheckpointManager(self.run_dir, keep=t.keep_checkpoints, rank=dist.rank, world_size=dist.world_size,
                                      barrier=barrier if dist.world_size > 1 else None)
        self.step = 0
        self.counters = {"nonfinite_skips": 0, "consecutive_nonfinite": 0, "tokens": 0, "train_time_s": 0.0, "meta_time_s": 0.0,
                         "meta_updates": 0}
        self._val_cursor = 0
        if self.resume_path:
            self._restore(self.resume_path)
        self.logger = make_logger(dist.is_main, self.run_dir, self.total_steps, resume=self.resume_path is not None)
        if dist.is_main:
            save_yaml(cfg, os.path.join(self.run_dir, "config.yaml"))
            self.logger.info(self.data.train_pairs.report())

    # ------------------------------------------------------------------------------------ setup
    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _deepspeed_engine(self, lr_fn):
        """DeepSpeed (ZeRO-3 by default with several ranks). Under ZeRO-3 the reference model is
        sharded like the policy (engine.ShardedReference, set up by the caller). The meta-update's
        replica stays a full copy per rank (refreshed from the gathered parameters every K steps):
        it costs one model's memory per rank."""
        import copy

        from .. import configs
        from ..config import deepspeed_config
        from .parallel import DeepSpeedEngine

        t = self.cfg.train
        if t.optimizer != "adamw":
            raise ValueError(f"train.optimizer={t.optimizer!r}: the DeepSpeed path supports adamw only")
        if t.deepspeed is None:
            t.deepspeed = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "zero3.json")
        ds_cfg = deepspeed_config(self.cfg, self.dist.world_size, hidden_size=self.model.config.hidden_size)
        self._ds_cfg = ds_cfg
        if self.meta_net is not None:
            self.meta_replica = copy.deepcopy(self.model)
        return DeepSpeedEngine(self.model, ds_cfg, t.lr, t.weight_decay, lr_fn)

    def _uses_deepspeed(self) -> bool:
        return self.cfg.train.deepspeed is not None or self.dist.world_size > 1

    def _zero3_planned(self) -> bool:
        """Whether this run will shard the policy (and so the reference) with ZeRO-3."""
        t = self.cfg.train
        if not self._uses_deepspeed():
            return False
        if t.deepspeed is None:
            return True  # the bundled configs/zero3.json
        from ..config import deepspeed_config

        ds = deepspeed_config(self.cfg, self.dist.world_size)  # validates the file (ConfigError naming it)
        return ds.get("zero_optimization", {}).get("stage", 0) == 3

    def _make_meta_learner(self):
        from ..metapo.bilevel import MetaLearner

        m, t = self.cfg.meta, self.cfg.train
        return MetaLearner(self.meta_net, lr=m.lr, interval=m.interval, lambda_margin=m.lambda_margin,
                           entropy_coef=m.entropy_coef, inner_lr=m.inner_lr_for_lookahead or t.lr,
                           loss_type=self.cfg.loss.loss_type, loss_params=self._loss_params())

    def _loss_params(self):
        from ..losses import LossParams

        l = self.cfg.loss
        return LossParams(l.beta, l.label_smoothing, l.focal_gamma, l.simpo_gamma, l.orpo_lambda)

    def _loss_kwargs(self) -> dict:
        l = self.cfg.loss
        return dict(loss_type=l.loss_type, beta=l.beta, label_smoothing=l.label_smoothing, focal_gamma=l.focal_gamma,
                    simpo_gamma=l.simpo_gamma, orpo_lambda=l.orpo_lambda, chunk_bytes=l.chunk_bytes, backend=l.backend)

    # ------------------------------------------------------------------------------- one step
    def _forward_stats(self, batch, weights_fn=None, *, stack: contextlib.ExitStack):
        """Hidden states, then the fused loss. With ``weights_fn`` (MetaPO), a no-grad pass first
        gives z and KL, ``weights_fn(z, kl)`` the weights, and the gradient pass reuses the
        reference log-probs of the first pass.

        Under ZeRO-3 the LM heads are gathered only after both decoder forwards: with tied
        embeddings the embedding's post-forward hook would release a head gathered earlier. The
        policy head stays gathered on ``stack`` (through the caller's backward); the reference head
        only for the fused loss's forward."""
        ids, mask, labels = (batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        plan = pack_plan(self.model, batch["attention_mask"], self.device)  # from the CPU mask: no sync
        self.eng.begin_forward()
        hidden = last_hidden_states(self.model, ids, mask, plan=plan)
        ref_hidden = self._ref_hidden(ids, mask, plan)
        stack.enter_context(self.eng.head_gathered())
        head = lm_head_of(self.model)
        kw = self._loss_kwargs()
        with self._ref_head():
            ref_kw = self._ref_head_inputs(ref_hidden)
            if weights_fn is None:
                out = fused_linear_preference_loss(hidden, head.weight, labels, bias=head.bias, **ref_kw, **kw)
                return out, out, None
            with torch.no_grad():
                stats = fused_linear_preference_loss(hidden.detach(), head.weight, labels, bias=head.bias, **ref_kw, **kw)
            del ref_kw
        w = weights_fn(stats)
        ref_logps = None if stats.ref_chosen_logps is None else (stats.ref_chosen_logps, stats.ref_rejected_logps)
        out = fused_linear_preference_loss(hidden, head.weight, labels, bias=head.bias, ref_logps=ref_logps,
                                           sample_weights=w, compute_kl=False, **kw)
        return out, stats, w

    def _pinned(self, batch: dict) -> dict:
        """On CUDA, the collated batch in pinned host memory, so that its copies to the device are
        asynchronous (a copy from pageable memory waits for the GPU: a host sync per tensor)."""
        if self.device.type != "cuda":
            return batch
        copied = ("input_ids", "attention_mask", "labels", "pair_ids")  # what the step moves to the device
        return {k: v.pin_memory() if k in copied else v for k, v in batch.items()}

    @torch.no_grad()
    def _ref_hidden(self, ids, mask, plan) -> Optional[torch.Tensor]:
        """The reference's last hidden states on the training device (None without a reference)."""
        if self.ref is None:
            return None
        rdev = compute_device(self.ref)
        rplan = plan if plan is None or rdev == self.device else plan.to(rdev)
        self._ref_begin_forward()
        return last_hidden_states(self.ref, ids.to(rdev), mask.to(rdev), plan=rplan).to(self.device)

    def _ref_head_inputs(self, ref_hidden: Optional[torch.Tensor]) -> dict:
        """Fused-loss arguments of the reference (inside ``self._ref_head()`` under ZeRO-3)."""
        if ref_hidden is None:
            return {}
        rhead = lm_head_of(self.ref)
        return dict(ref_hidden=ref_hidden, ref_weight=rhead.weight.to(self.device, non_blocking=True),
                    ref_bias=None if rhead.bias is None else rhead.bias.to(self.device, non_blocking=True))

    @torch.no_grad()
    def _ref_logps(self, batch) -> torch.Tensor:
        """``(2B,)`` reference log-probs (chosen then rejected) of a batch: the meta-update's
        validation batch carries them, so the meta-learner never touches the reference model."""
        ids, mask, labels = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        rh = self._ref_hidden(ids, mask, pack_plan(self.ref, batch["attention_mask"], self.device))
        with self._ref_head():
            r = self._ref_head_inputs(rh)
            return fused_sequence_logps(rh, r["ref_weight"], labels, bias=r["ref_bias"], chunk_bytes=self.cfg.loss.chunk_bytes,
                                        backend=self.cfg.loss.backend)

    def _kl_or_zeros(self, stats) -> torch.Tensor:
        return stats.kl if stats.kl is not None else torch.zeros_like(stats.margins)

    def _track(self, pair_ids: torch.Tensor, stats) -> torch.Tensor:
        kl = self._kl_or_zeros(stats)
        ids, seen = pair_ids, torch.stack([stats.margins.float(), kl.float()], 1)
        if self.dist.world_size > 1:  # every rank keeps every pair's last visit, like the tracker replica
            import torch.distributed as tdist

            packed = torch.cat([pair_ids.double().unsqueeze(1), seen.double()], 1)
            parts = [torch.empty_like(packed) for _ in range(self.dist.world_size)]
            tdist.all_gather(parts, packed)
            allp = torch.cat(parts)
            ids, seen = allp[:, 0].long(), allp[:, 1:].float()
        self.last_seen[ids] = seen
        return self.tracker.update(pair_ids, stats.margins, kl)

    def _train_step(self) -> dict:
        """One optimiser step over ``grad_accum`` micro-batches; returns its metrics (tensors)."""
        t0 = time.perf_counter()
        agg: dict[str, list] = {}
        snapshots = []
        skipped_micro = False
        it = iter(self.sampler)
        for _ in range(self.grad_accum):
            idx = next(it, None)
            if idx is None:  # epoch boundary inside an accumulation window
                idx = next(iter(self.sampler))
            batch = self._pinned(self.data.collator([self.data.train[i] for i in idx]))
            pair_ids = batch["pair_ids"].to(self.device, non_blocking=True)
            snapshots.append((pair_ids, self.tracker.state[pair_ids].clone()))
            feats_box = {}

            def weights_fn(stats, pair_ids=pair_ids, box=feats_box):
                box["s"] = self._track(pair_ids, stats)
                return self.meta_net(box["s"], update_stats=True).detach()

            with contextlib.ExitStack() as stack:  # (ZeRO-3) holds the head's full weight through the backward
                out, stats, w = self._forward_stats(batch, weights_fn if self.meta_net is not None else None, stack=stack)
                if w is None:
                    feats_box["s"] = self._track(pair_ids, stats)
                    w = torch.ones_like(stats.margins)
                ok = True if isinstance(self.eng, PlainEngine) else self.eng.loss_finite(out.loss)
                if ok:
                    self.eng.backward(out.loss, self.grad_accum)
            if ok:
                self.eng.micro_step()
            else:
                skipped_micro = True
            last = dict(batch)
            if stats.ref_chosen_logps is not None:  # the meta-update's ghost pass reuses them
                last["ref_logps"] = torch.cat([stats.ref_chosen_logps, stats.ref_rejected_logps])
            self._last = (last, feats_box["s"])
            self.counters["tokens"] += int(batch["attention_mask"].sum())
            for k, v in self._batch_metrics(out, stats, w).items():
                agg.setdefault(k, []).append(v)
        metrics = {k: torch.stack(v).mean() for k, v in agg.items()}
        gnorm, finite = self.eng.clip_and_check(metrics["loss"])
        finite = finite and not skipped_micro
        if finite:
            self.eng.step()
            self.counters["consecutive_nonfinite"] = 0
        else:
            for ids, rows in reversed(snapshots):  # no tracker update for a skipped step
                self.tracker.state[ids] = rows
            self.counters["nonfinite_skips"] += 1
            self.counters["consecutive_nonfinite"] += 1
            bad = torch.cat([ids for ids, _ in snapshots]).tolist()
            self.logger.info(f"step {self.step + 1}: non-finite loss or gradient, step skipped (pairs {bad})")
            if self.counters["consecutive_nonfinite"] >= self.cfg.train.max_consecutive_nonfinite:
                raise NonFiniteError(f"{self.counters['consecutive_nonfinite']} consecutive non-finite steps (last at step "
                                     f"{self.step + 1}, pairs {bad}); stopping. Lower train.lr or check the data.")
        self.eng.end_step()
        metrics["grad_norm"] = gnorm
        self.counters["train_time_s"] += time.perf_counter() - t0
        return metrics

    @staticmethod
    def _batch_metrics(out, stats, w) -> dict:
        m = {"loss": out.loss.detach(), "rewards/margins": stats.margins.mean(), "rewards/accuracies": stats.accuracies.mean(),
             "logps/chosen": stats.chosen_logps.mean(), "logps/rejected": stats.rejected_logps.mean(),
             "metapo/weight_mean": w.mean(), "metapo/weight_std": w.std(unbiased=False)}
        if stats.chosen_rewards is not None:
            m["rewards/chosen"] = stats.chosen_rewards.mean()
            m["rewards/rejected"] = stats.rejected_rewards.mean()
        if stats.kl is not None:
            m["metapo/kl"] = stats.kl.mean()
        return {k: v.float() for k, v in m.items()}

    def _val_batch(self):
        n = len(self.data.val)
        k = min(self.cfg.meta.val_batch_size // self.dist.world_size, n)
        idx = [(self._val_cursor + i) % n for i in range(self.dist.rank * k, (self.dist.rank + 1) * k)]
        self._val_cursor = (self._val_cursor + k * self.dist.world_size) % n
        return self.data.collator([self.data.val[i] for i in idx])

    def _meta_update(self) -> dict:
        t0 = time.perf_counter()
        batch, feats = self._last
        model = self.eng.full_copy_into(self.meta_replica) if self.meta_replica is not None else self.model
        val = self._val_batch()
        if self.ref is not None:
            val["ref_logps"] = self._ref_logps(val)
        diag = self.meta.step(model, batch, val, feats, ref_model=self.ref)
        dt = time.perf_counter() - t0
        self.counters["meta_time_s"] += dt
        self.counters["meta_updates"] += 1
        out = {f"metapo/{k}": v for k, v in diag.items() if isinstance(v, (int, float))}
        if self.meta_net.arch == "linear":
            out.update({f"metapo/coef/{k}": v for k, v in self.meta_net.coefficients().items()})
        out["metapo/meta_update_s"] = dt
        return out

    # ------------------------------------------------------------------------------ main loop
    def train(self) -> dict:
        t, m = self.cfg.train, self.cfg.meta
        while self.step < self.total_steps:
            metrics = self._train_step()
            self.step += 1
            extra = {}
            if self.meta is not None and self.step % m.interval == 0:
                extra = self._meta_update()
            if self.step % t.log_every == 0 or self.step == self.total_steps or extra:
                rec = {k: float(v) for k, v in metrics.items()}
                rec.update(extra, lr=self.eng.lr(), epoch=self.sampler.epoch,
                           tokens_per_s=self.counters["tokens"] / max(self.counters["train_time_s"], 1e-9),
                           step_time_s=self.counters["train_time_s"] / self.step, nonfinite_skips=self.counters["nonfinite_skips"])
                if torch.cuda.is_available():
                    rec["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
                    mfu = _mfu(self.model, rec["tokens_per_s"] * self.dist.world_size)
                    if mfu is not None:
                        rec["mfu"] = mfu
                self.logger.log(self.step, rec)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.logger.log(self.step, self.evaluate(), console=True)
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save()
            self.logger.advance()
        summary = self.finish()
        self.logger.close()
        return summary

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _margins(self, ds, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Policy margins z (the loss's logit) and per-pair KL for every pair of ``ds``."""
        zs, kls = [], []
        for s in range(0, len(ds), batch_size):
            batch = self.data.collator([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
            self.model.eval()
            with contextlib.ExitStack() as stack:
                _, stats, _ = self._forward_stats(batch, stack=stack)
            self.model.train()
            zs.append(stats.margins.double().cpu())
            kls.append(self._kl_or_zeros(stats).double().cpu())
        return torch.cat(zs).numpy(), torch.cat(kls).numpy()

    def evaluate(self) -> dict:
        """Clean held-out preference accuracy (z > 0) and mean margin."""
        if self.data.eval is None:
            return {}
        z, kl = self._margins(self.data.eval)
        return {"eval/accuracy": float((z > 0).mean()), "eval/margin": float(z.mean()), "eval/kl": float(kl.mean())}

    def pair_weights(self):
        """Weights of every training pair under the current meta-network, from the features of the
        pair's last visit (its margin and KL then, and the tracker's stored history)."""
        z, kl = self.last_seen.double().cpu().numpy().T
        st = self.tracker.state.detach().double().cpu().numpy()
        count = np.maximum(st[:, 5], 1.0)
        feats = np.stack([z, st[:, 0], np.sqrt(np.maximum(st[:, 4], 0) / count), st[:, 1], kl, st[:, 2]], 1)
        if self.meta_net is None:
            w = np.ones(len(z))
        else:
            with torch.no_grad():
                w = self.meta_net(torch.as_tensor(feats, dtype=torch.float32, device=self.device)).double().cpu().numpy()
        return z, feats, w

    def finish(self) -> dict:
        t_end = time.perf_counter()
        ev = self.evaluate()
        z, feats, w = self.pair_weights()
        tr = self.data.train
        extra = {k: tr.column(k) for k in ("is_flipped", "is_ambiguous") if k in tr.pairs.extra}
        summary = {"steps": self.step, "run_dir": os.path.abspath(self.run_dir), **ev,
                   "tokens_per_s": self.counters["tokens"] / max(self.counters["train_time_s"], 1e-9),
                   "meta_overhead_pct": 100 * self.counters["meta_time_s"] / max(self.counters["train_time_s"], 1e-9),
                   "meta_updates": self.counters["meta_updates"], "nonfinite_skips": self.counters["nonfinite_skips"],
                   "weight_mean": float(w.mean()), "weight_std": float(w.std()), **self._reference_footprint()}
        if "is_flipped" in extra and extra["is_flipped"].min() >= 0:
            clean = extra["is_flipped"] == 0
            summary["weights_auroc_clean_vs_flipped"] = auroc(w, clean)
            summary["margin_auroc_clean_vs_flipped"] = auroc(z, clean)  # the margin alone, as a yardstick for the weights
            summary["weights_spearman_cleanliness"] = spearman(w, clean.astype(float))
        if self.meta_net is not None and self.meta_net.arch == "linear":
            summary["coefficients"] = self.meta_net.coefficients()
        if self.dist.is_main:
            write_pair_table(os.path.join(self.run_dir, "pair_weights.csv"), np.arange(len(tr)), tr.source_rows, w,
                             sigmoid(z), feats, extra)
        self.save(final=True)
        if self.dist.is_main:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
            atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(clean, indent=1))
            self.logger.log(self.step, {k: v for k, v in summary.items() if isinstance(v, (int, float))}, console=False)
            self.logger.info("summary: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                      for k, v in summary.items() if k != "coefficients"}))
            self.logger.info(f"run directory: {os.path.abspath(self.run_dir)}")
            self.logger.info(f"report: python -m metapo_fast.report {os.path.abspath(self.run_dir)}")
        summary["finish_time_s"] = time.perf_counter() - t_end
        return summary

    def _reference_footprint(self) -> dict:
        """Where the reference lives and how many of its parameters this rank holds (ZeRO-3: its
        partition; otherwise all of them)."""
        if self.ref is None:
            return {"reference": "none"}
        local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in self.ref.parameters())
        total = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in self.ref.parameters())
        return {"reference": self.ref_placement, "reference_params_on_rank": int(local), "reference_params_total": int(total)}

    # --------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {
            "step": self.step,
            "tracker": self.tracker.state_dict(), "last_seen": self.last_seen.cpu(), "meta": None if self.meta is None else self.meta.state_dict(),
            "sampler": self.sampler.state_dict(), "counters": dict(self.counters), "val_cursor": self._val_cursor,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "fingerprint": config_fingerprint(self.cfg),
        }

    def save(self, final: bool = False) -> str:
        def writer(d: str) -> None:  # runs on every rank (DeepSpeed saves its partitions collectively)
            eng_state = self.eng.save(d, self.dist.is_main)
            if self.dist.is_main:
                self.tok.save_pretrained(os.path.join(d, "model"))
                torch.save({**self._state(), **eng_state}, os.path.join(d, "trainer_state.pt"))
                save_yaml(self.cfg, os.path.join(d, "config.yaml"))
                z, feats, w = self.pair_weights()
                tr = self.data.train
                write_pair_table(os.path.join(d, "pair_weights.csv"), np.arange(len(tr)), tr.source_rows, w, sigmoid(z), feats)

        path = self.ckpt.save(self.step, writer, meta={"fingerprint": config_fingerprint(self.cfg), "step": self.step})
        if final:
            final_dir = os.path.join(self.run_dir, "final_model")
            self.eng.save_pretrained(final_dir, self.dist.is_main)
            if self.dist.is_main:
                self.tok.save_pretrained(final_dir)
        return path

    def _find_resume(self) -> Optional[str]:
        r = self.cfg.train.resume
        if r is None:
            return None
        if r == "auto":
            found = CheckpointManager(self.run_dir).latest_valid()
            return None if found is None else found[1]
        ok, reason = CheckpointManager.verify(r)
        if not ok:
            raise ValueError(f"train.resume={r!r} is not a usable checkpoint: {reason}")
        return r

    @staticmethod
    def _load_weights(model, path: str) -> None:
        from transformers import AutoModelForCausalLM

        src = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
        model.load_state_dict(src.state_dict())

    def _restore(self, path: str) -> None:
        check_resume_compatible(path, self.cfg)  # names every differing field
        st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False, map_location="cpu")
        self.eng.load(path, st, self._load_weights)
        self.tracker.load_state_dict(st["tracker"])
        self.last_seen.copy_(st["last_seen"])
        if self.meta is not None:
            self.meta.load_state_dict(st["meta"])
        self.sampler.load_state_dict(st["sampler"])
        self.counters.update(st["counters"])
        self._val_cursor = st["val_cursor"]
        self.step = st["step"]
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        _truncate_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.step)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after ``step`` by the run that crashed, so the resumed log has no duplicates."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))


# Dense bf16 peak FLOP/s per GPU (vendor datasheets; no sparsity), for MFU.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A40": 150e12}


def _mfu(model, tokens_per_s_all_ranks: float) -> Optional[float]:
    """Model FLOPs utilisation: 6 * parameters * tokens/s over the GPUs' peak (None for unknown GPUs).
    The reference forward (2 * parameters per token) is not counted as useful work."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return 6 * n * tokens_per_s_all_ranks / (peak * world)
