"""The MetaPO training loop (paper Algorithm 1; docs/math.md), top to bottom.

One optimiser step (:meth:`Trainer._train_step`):
  for each micro-batch:  policy and reference hidden states -> the fused loss's single pass; per
  chunk of pairs (MetaPO) this step's margins z and KL -> the tracker updates each pair's history
  in place and returns its features s -> raw weights w = w_phi(s) -> the chunk's gradient
  (``meta.normalize=none``: a no-grad pass for z first, then the weighted pass) -> backward.
  Then the weights' normalisation over the whole step (``batch_mean``: the step's gradient is
  divided by the mean raw weight of all its micro-batches and ranks, by the engine), clip, skip
  the step if anything is non-finite,
  every K steps from ``meta.start_fraction`` of the run the meta-update (:meth:`Trainer._meta_update`: at theta_t, before the optimiser
  step, on every micro-batch of the step), optimiser and scheduler step.
Every E steps an evaluation;
crash-safe checkpoints every S steps (``state.py``). Building the run is ``setup.py``'s job, the
forward ``forward.py``'s, what the run writes ``outputs.py``'s.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from ..comm import barrier
from ..config import MetaPOConfig, save_yaml
from ..data.batches import PairSampler
from ..metapo.tracker import TemporalTracker
from ..metapo.weight_net import prompt_centred
from . import outputs, state
from .forward import PairForward, kl_or_zeros
from .outputs import make_logger
from .parallel import DistInfo, PlainEngine, uses_deepspeed
from .setup import build_data, build_engine, build_models, lr_schedule, make_meta_learner, make_meta_net, seed_everything
from .state import CheckpointManager

__all__ = ["Trainer", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: MetaPOConfig, dist: DistInfo):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        t, m = cfg.train, cfg.meta
        self.run_dir = t.output_dir
        os.makedirs(self.run_dir, exist_ok=True)
        seed_everything(t.seed)
        self.resume_path = state.find_resume(cfg)
        main = dist.is_main
        with outputs.phase("loading the model and tokenizer" + (f", then the SFT warm-up of the reference ({t.sft_warmup_steps} steps)"
                                                                if t.sft_warmup_steps and not self.resume_path else ""), main):
            models = build_models(cfg, dist, self.run_dir, resumed=self.resume_path is not None)
        self.tok, self.model = models.tok, models.model
        with outputs.phase("loading and tokenising the data", main):
            self.data = build_data(cfg, self.tok, models.ref, self.device, models.task)
        n = len(self.data.train)
        self.tracker = TemporalTracker(n, alpha=cfg.tracker.alpha, device=self.device)
        # (margin, KL) of each pair's last visit: with the tracker's history these give the exact
        # features the meta-network saw, for the pair-weights table (8 more bytes per pair).
        self.last_seen = torch.zeros(n, 2, dtype=torch.float32, device=self.device)
        self.meta_net = make_meta_net(cfg, self.device, n) if m.enabled else None
        self.pair_filter = self.meta_net if m.enabled and m.weighting == "static_filter" else None
        if self.pair_filter is not None and m.filter_by == "oracle":
            self.oracle_flipped = self._flipped_column()
        learned = m.enabled and m.weighting == "learned"
        self.meta = make_meta_learner(cfg, self.meta_net) if learned else None
        self.sampler = PairSampler(n, t.per_device_batch_size, dist.world_size, dist.rank, seed=t.seed)
        self.grad_accum = t.resolved_grad_accum(dist.world_size)
        self.total_steps = t.max_steps if t.max_steps is not None else self.sampler.batches_per_epoch // self.grad_accum * t.epochs
        if self.meta is not None:
            self.meta.start_step = round(m.start_fraction * self.total_steps)
        with outputs.phase("setting up " + ("DeepSpeed" if uses_deepspeed(cfg, dist.world_size) else "the optimiser"), main):
            par = build_engine(cfg, dist, self.model, models.ref, models.ref_placement, lr_schedule(cfg, self.total_steps))
        self.eng, self.model, self.ref, self.ref_placement = par.eng, par.model, par.ref, par.ref_placement
        if self.meta is not None:  # the meta pass runs on the engine's module (ZeRO-3: partitioned, gathered per layer)
            self.meta.before_forward = self.eng.reset_fetch_trace
            self.meta.after_backward = self.eng.release_leftovers
        if self.meta_net is not None and self.meta_net.normalize == "batch_mean" and not isinstance(self.eng, PlainEngine):
            self.eng.check_step_normalisation()  # what the engine cannot scale is refused before step 1
        if self.meta is not None and self.meta.preconditioner == "adam":  # the config refuses it with DeepSpeed
            self.meta.inner_optimizer = self.eng.optimizer  # keyed by self.model's parameters, which the meta-update uses
        self.fwd = PairForward(self.model, self.ref, self.eng, self.device, cfg.loss.loss_type, cfg.loss.to_loss_params(),
                               cfg.loss.chunk_bytes, cfg.loss.backend, par.ref_head, par.ref_begin_forward)
        self.ckpt = CheckpointManager(self.run_dir, keep=t.keep_checkpoints, rank=dist.rank, world_size=dist.world_size,
                                      barrier=barrier if dist.world_size > 1 else None)
        self.step, self.val_cursor = 0, 0
        self.weights_per_chunk = True  # MetaPO's weights inside the fused loss's single pass (see _train_step)
        self.counters = {"nonfinite_skips": 0, "consecutive_nonfinite": 0, "tokens": 0, "train_time_s": 0.0, "meta_time_s": 0.0,
                         "meta_updates": 0}
        self.meta_log: dict = {}  # the last meta-update's diagnostics, logged with its step
        if self.resume_path:
            with outputs.phase(f"resuming from {self.resume_path}", main):
                state.restore(self, self.resume_path)
            if main:
                outputs.log.info("resumed at step %d of %d", self.step, self.total_steps)
        self.logger = make_logger(dist.is_main, self.run_dir, self.total_steps, resume=self.resume_path is not None)
        if dist.is_main:
            save_yaml(cfg, os.path.join(self.run_dir, "config.yaml"))
            self.logger.info(self.data.train_pairs.report())

    # ------------------------------------------------------------------------------ main loop
    def train(self) -> dict:
        t, m = self.cfg.train, self.cfg.meta
        if self.dist.is_main:
            self.logger.info(self.start_line())
            if self.meta is not None and not any(self.meta.due(s) for s in range(self.step + 1, self.total_steps + 1)):
                outputs.log.warning(f"no meta-update will run: meta.interval={m.interval} from step {self.meta.start_step} "
                                    f"(meta.start_fraction={m.start_fraction:g}) leaves none in steps {self.step + 1}-"
                                    f"{self.total_steps}; every pair weighs 1 (plain {self.cfg.loss.loss_type} loss)")
        while self.step < self.total_steps:
            metrics = self._train_step(meta=self.meta is not None and self.meta.due(self.step + 1))
            self.step += 1
            if self.pair_filter is not None and self.step == self.pair_filter.after_steps:
                self._fit_filter()
            extra, self.meta_log = self.meta_log, {}
            if self.step % t.log_every == 0 or self.step == self.total_steps or extra:
                self.logger.log(self.step, outputs.step_record(self, metrics, extra))
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.logger.log(self.step, self.evaluate(), console=True)
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save()
            self.logger.advance()
        summary = outputs.finish(self)
        self.logger.close()
        return summary

    def start_line(self) -> str:
        """What this run is: steps, world size, per-device and global batch, engine, weighting."""
        t, m, ws = self.cfg.train, self.cfg.meta, self.dist.world_size
        per = t.per_device_batch_size
        stage = "plain PyTorch" if isinstance(self.eng, PlainEngine) else f"DeepSpeed ZeRO stage {self.eng.engine.zero_optimization_stage()}"
        weights = ("MetaPO weights, meta-update every K=%d steps%s" % (m.interval, f" from step {self.meta.start_step}" if self.meta is not None and self.meta.start_step else "") if m.enabled and m.weighting == "learned"
                   else f"static filter (drops {m.filter_fraction:.0%} of the pairs, lowest margin first, after step "
                        f"{m.filter_after_steps})" if m.enabled and m.weighting == "static_filter"
                   else "ema_margin weights" if m.enabled else "no pair weights")
        return (f"training: steps {self.step + 1}-{self.total_steps} of {self.total_steps}; world size {ws}; "
                f"{per} pairs per device x {ws} ranks x {self.grad_accum} micro-steps = {per * ws * self.grad_accum} pairs "
                f"per step; {stage}; {self.cfg.loss.loss_type} loss, {weights}")

    # ------------------------------------------------------------------------------- one step
    def _train_step(self, meta: bool = False) -> dict:
        """One optimiser step over ``grad_accum`` micro-batches; returns its metrics (tensors). With
        ``meta``, the meta-update runs inside the step (its diagnostics land in ``self.meta_log``)."""
        t0 = time.perf_counter()
        agg: dict[str, list] = {}
        snapshots, micro = [], []  # tracker rows to restore on a skip; (batch, features) for the meta-update
        losses_finite = torch.ones((), dtype=torch.bool, device=self.device)  # every micro-batch's loss, on the device
        # raw weights here; batch_mean divides the step's gradient by their mean over the whole step
        # (every micro-batch, every rank) in the engine below
        step_norm = self.meta_net is not None and self.meta_net.normalize == "batch_mean"
        # step-wide normalisation: the weights are a per-pair function of the pairs' own statistics,
        # so the fused loss asks for them chunk by chunk in its single pass (8NHV); with several
        # ranks each chunk's features come from this rank's tracker rows (a pair is on one rank),
        # and the replica is brought level once per micro-batch after the pass (_sync_tracker).
        # normalize=none: a margins pass first (10NHV)
        per_chunk = self.weights_per_chunk and step_norm
        w_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        w_count = 0
        it = iter(self.sampler)
        for j in range(self.grad_accum):
            idx = next(it, None)
            if idx is None:  # epoch boundary inside an accumulation window
                idx = next(iter(self.sampler))
            batch = self._pinned(self.data.collator([self.data.train[i] for i in idx]))
            pair_ids = batch["pair_ids"].to(self.device, non_blocking=True)
            seen = {}

            def weights_fn(stats, pair_ids=pair_ids, seen=seen):  # MetaPO: features from this step's margins
                seen["features"] = self._track(pair_ids, stats, snapshots)
                return self.meta_net(seen["features"], normalize=False).detach()

            def chunk_weights_fn(pairs, stats, pair_ids=pair_ids, seen=seen):  # the same, for one chunk's pairs
                if self.dist.world_size > 1:  # this rank's rows only; every rank's after the pass
                    f = self._track_local(pair_ids[pairs], stats, seen.setdefault("local", []))
                else:
                    f = self._track(pair_ids[pairs], stats, snapshots)
                seen.setdefault("chunks", []).append((pairs, f))
                return self.meta_net(f, normalize=False).detach()

            # the static filter's weights are known before the forward: one fused-loss pass
            fixed = None if self.pair_filter is None else self.pair_filter.pair_weights(pair_ids, normalize=False)
            with contextlib.ExitStack() as stack:  # (ZeRO-3) holds the head's full weight through the backward
                learned = self.meta_net is not None and fixed is None
                wfn = weights_fn if learned and not per_chunk else None
                out, stats, w = self.fwd(batch, wfn, stack=stack, weights=fixed,
                                         chunk_weights_fn=chunk_weights_fn if learned and per_chunk else None)
                if "chunks" in seen:  # the features in the batch's pair order
                    feats = torch.empty(pair_ids.shape[0], seen["chunks"][0][1].shape[1], device=self.device,
                                        dtype=seen["chunks"][0][1].dtype)
                    for pairs, f in seen.pop("chunks"):
                        feats[pairs] = f
                    seen["features"] = feats
                    if "local" in seen:  # several ranks: the replica takes every rank's rows, in rank order
                        self._sync_tracker(pair_ids, stats, snapshots, seen.pop("local"))
                elif wfn is None:
                    seen["features"] = self._track(pair_ids, stats, snapshots)
                if w is None:
                    w = torch.ones_like(stats.margins)
                losses_finite &= torch.isfinite(out.loss.detach())
                # always: a non-finite micro-batch is dropped with the whole step below, on every rank
                # alike, and ZeRO's gradient reduction in the backward is collective
                self.eng.backward(out.loss, self.grad_accum)
            if j < self.grad_accum - 1:
                self.eng.micro_step()  # DeepSpeed: a non-boundary micro-step; the boundary is step() or skip()
            last = None
            if meta:  # the meta-update's ghost pass reuses this micro-batch's reference log-probs
                last = dict(batch)
                if stats.ref_chosen_logps is not None:
                    last["ref_logps"] = torch.cat([stats.ref_chosen_logps, stats.ref_rejected_logps])
            micro.append((last, seen["features"]))
            w_sum += w.sum()
            w_count += w.numel()
            self.counters["tokens"] += int(batch["attention_mask"].numpy().sum())  # host tensor: no device read
            for k, v in outputs.batch_metrics(out, stats, w).items():
                agg.setdefault(k, []).append(v)
        metrics = {k: torch.stack(v).mean() for k, v in agg.items()}
        # the step's one host read: every loss and the gradient norm finite, on every rank (all-reduced);
        # with batch_mean the gradient is scaled by 1 / mean(w over the whole step, every rank)
        gnorm, finite, grad_scale = self.eng.clip_and_check(losses_finite, (w_sum, w_count) if step_norm else None)
        if grad_scale is not None:
            for k in ("loss", "metapo/weight_mean", "metapo/weight_std"):
                metrics[k] = metrics[k] * grad_scale
        meta_s = 0.0  # meta-update time in this step, not training time
        if finite:
            if meta:
                meta_s += self._meta_update(micro)  # theta_t: the optimiser step is not taken yet
            if self.meta_net is not None:  # the step's features join the statistics after the step used them
                self.meta_net.update_stats(torch.cat([f for _, f in micro]))
            self.eng.step()
            self.counters["consecutive_nonfinite"] = 0
        else:
            self.eng.skip()  # every rank: the decision was all-reduced
            self._skip_step(snapshots)
        self.eng.end_step()
        metrics["grad_norm"] = gnorm
        if self.cfg.train.sync_step_timing and self.device.type == "cuda":  # benchmarks: the queued optimiser work in the time
            torch.cuda.synchronize(self.device)
        self.counters["train_time_s"] += time.perf_counter() - t0 - meta_s
        return metrics

    def _fit_filter(self) -> None:
        """Static filtering: the margins of every training pair under the current policy, once;
        the lowest ``meta.filter_fraction`` are dropped for the rest of the run. With
        ``meta.filter_by=oracle``, exactly the pairs marked ``is_flipped`` (no forward pass)."""
        t0 = time.perf_counter()
        if self.cfg.meta.filter_by == "oracle":
            flipped = self.oracle_flipped
            dropped = self.pair_filter.fit(-flipped.astype(np.float64), count=int(flipped.sum()))
            if self.dist.is_main:
                self.logger.info(f"step {self.step}: oracle filter {self._filtered_to()} the {dropped} of {len(flipped)} training "
                                 f"pairs marked is_flipped (a diagnostic: the ceiling of a detector acting from here)")
            return
        z, _ = self.fwd.margins(self.data.train, self.data.collator)
        by = "margin"
        if self.cfg.meta.filter_by == "prompt_margin":
            z, by = prompt_centred(z, self.data.train.prompt_groups()), "margin minus its prompt's mean"
        dropped = self.pair_filter.fit(z)
        dt = time.perf_counter() - t0
        self.counters["meta_time_s"] += dt  # overhead of the weighting, like a meta-update
        if self.dist.is_main:
            self.logger.info(f"step {self.step}: static filter {self._filtered_to()} {dropped} of {len(z)} training pairs "
                             f"({by} <= {float(np.sort(z)[max(dropped - 1, 0)]):.4g}) in {dt:.1f} s")

    def _filtered_to(self) -> str:
        w = self.pair_filter.filtered_weight
        return "dropped" if w == 0 else f"down-weighted to {w:g}"

    def _flipped_column(self) -> np.ndarray:
        """The training set's ``is_flipped`` flags (pair-id order) for ``meta.filter_by=oracle``;
        refused at start-up when the data has none for some pair."""
        ds = self.data.train
        flags = ds.column("is_flipped") if "is_flipped" in ds.pairs.extra else None
        if flags is None or len(flags) == 0 or np.asarray(flags).min() < 0:
            where = self.cfg.data.path or "the synthetic task"
            missing = "no is_flipped column" if flags is None else "rows without is_flipped"
            raise ValueError(f"meta.filter_by=oracle drops the pairs the training data marks is_flipped, but "
                             f"{where} has {missing} (use meta.filter_by=margin)")
        return np.asarray(flags) > 0

    def _pinned(self, batch: dict) -> dict:
        """On CUDA, the collated batch in pinned host memory, so that its copies to the device are
        asynchronous (a copy from pageable memory waits for the GPU: a host sync per tensor)."""
        if self.device.type != "cuda":
            return batch
        copied = ("input_ids", "attention_mask", "labels", "pair_ids")  # what the step moves to the device
        return {k: v.pin_memory() if k in copied else v for k, v in batch.items()}

    def _track(self, pair_ids: torch.Tensor, stats, snapshots: list) -> torch.Tensor:
        """Update the tracker with this micro-batch's margins and KL; return the pairs' features.
        The rows it changes (every rank's pairs: the tracker is a replica) are appended to
        ``snapshots`` first, so that a skipped step can restore them on every rank."""
        kl = kl_or_zeros(stats)
        # every rank's pairs (one all-gather with several ranks): every rank keeps every pair's last
        # visit, like the tracker replica, and the tracker takes the same gathered rows
        every = self.tracker.gather(pair_ids, stats.margins, kl)
        ids, margins, kls = every
        snapshots.append((ids, self.tracker.state[ids].clone(), self.last_seen[ids].clone()))
        self.last_seen[ids] = torch.stack([margins, kls], 1)
        return self.tracker.update(pair_ids, stats.margins, kl, every_rank=every)

    def _track_local(self, pair_ids: torch.Tensor, stats, local: list) -> torch.Tensor:
        """This rank's pairs only, no collective (the single pass's per-chunk weights with several
        ranks): their features from this rank's tracker rows, which hold the same state as every
        rank's replica (a pair is on one rank per micro-batch). The rows are saved to ``local`` for
        :meth:`_sync_tracker`, which replaces this update by the replicated one."""
        kl = kl_or_zeros(stats)
        ids = pair_ids.long()
        local.append((ids, self.tracker.state[ids].clone()))
        return self.tracker.update(pair_ids, stats.margins, kl, every_rank=(ids, stats.margins.detach().float(), kl.detach().float()))

    def _sync_tracker(self, pair_ids: torch.Tensor, stats, snapshots: list, local: list) -> None:
        """After a single pass with per-chunk local updates: restore this rank's rows, then apply
        every rank's rows of the micro-batch in rank order (one all-gather), as :meth:`_track` does,
        so the replicas stay identical. The features the weights used equal the replicated update's
        except for a pair on two ranks in one micro-batch (a sampler's padding at an epoch's end)."""
        for ids, rows in reversed(local):
            self.tracker.state[ids] = rows
        self._track(pair_ids, stats, snapshots)

    def _skip_step(self, snapshots: list) -> None:
        """A non-finite loss or gradient on some rank: undo the step's tracker updates (every rank's
        pairs), count, log the step's pair ids (all ranks'), stop after too many."""
        for ids, rows, last in reversed(snapshots):
            self.tracker.state[ids] = rows
            self.last_seen[ids] = last
        self.counters["nonfinite_skips"] += 1
        self.counters["consecutive_nonfinite"] += 1
        bad = sorted(torch.cat([ids for ids, _, _ in snapshots]).tolist())
        self.logger.info(f"step {self.step + 1}: non-finite loss or gradient, step skipped on every rank (pairs {bad})")
        if self.counters["consecutive_nonfinite"] >= self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(f"{self.counters['consecutive_nonfinite']} consecutive non-finite steps (last at step "
                                 f"{self.step + 1}, pairs {bad}); stopping. Lower train.lr or check the data.")

    # --------------------------------------------------------------------------- meta-update
    def _val_batch(self) -> dict:
        """This rank's share of the next validation batch (a window that cycles over the split),
        with its reference log-probs."""
        n = len(self.data.val)
        k = min(self.cfg.meta.val_batch_size // self.dist.world_size, n)
        idx = [(self.val_cursor + i) % n for i in range(self.dist.rank * k, (self.dist.rank + 1) * k)]
        self.val_cursor = (self.val_cursor + k * self.dist.world_size) % n
        batch = self.data.collator([self.data.val[i] for i in idx])
        if self.ref is not None:
            batch["ref_logps"] = self.fwd.ref_logps(batch)
        return batch

    def _meta_update(self, micro: list) -> float:
        """Move phi by one meta-update at theta_t (before this step's optimiser step), with the
        lookahead over every micro-batch of the step, on the policy itself (under DeepSpeed its
        module, ZeRO-3-partitioned or not: the meta pass writes no ``p.grad`` and fires no ZeRO
        gradient hook, so the step's accumulated gradients are untouched, on the plain engine too).
        Returns its wall time; diagnostics go to ``self.meta_log``."""
        t0 = time.perf_counter()
        batches, feats = [b for b, _ in micro], torch.cat([f for _, f in micro])
        diag = self.meta.step(self.model, batches, self._val_batch(), feats, ref_model=self.ref)
        dt = time.perf_counter() - t0
        self.counters["meta_time_s"] += dt
        self.counters["meta_updates"] += 1
        out = {f"metapo/{k}": v for k, v in diag.items() if isinstance(v, (int, float))}
        if self.meta_net.arch == "linear":
            out.update({f"metapo/coef/{k}": v for k, v in self.meta_net.coefficients().items()})
        out["metapo/meta_update_s"] = dt
        self.meta_log = out
        return dt

    # ------------------------------------------------------------------- evaluation, saving
    def evaluate(self) -> dict:
        """Clean held-out preference accuracy (z > 0), mean margin and KL."""
        return outputs.evaluate(self.fwd, self.data)

    def save(self, final: bool = False) -> str:
        return state.save_checkpoint(self, final)
