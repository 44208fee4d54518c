"""Process groups and where the policy's parameters live: plain PyTorch on one process, or
DeepSpeed (ZeRO-3) when ``train.deepspeed`` is set or several ranks run (the bundled
configs/zero3.json by default). ``init_distributed`` reads torchrun's environment (NCCL on GPUs,
gloo on CPU).

The trainer talks to both through the same small interface: ``module`` (for the forward),
``head_gathered()`` (the LM head's full weight for the fused loss, which reads it directly
instead of calling the head module; kept gathered through the backward so the gradient reaches
a full-size parameter), ``backward``, ``step``, ``save`` / ``load`` and ``reset_fetch_trace`` (before the meta
pass's forwards, which run on the same module).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..comm import world_size
from ..models.hf import gathered, lm_head_of, release_zero3_leftovers, reset_zero3_trace

__all__ = ["DistInfo", "init_distributed", "destroy", "uses_deepspeed", "zero3_planned", "PlainEngine", "DeepSpeedEngine",
           "ShardedReference"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0, device: str = "auto") -> DistInfo:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise.

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail with an error
    after at most this long instead of hanging forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # DeepSpeed's ZeRO calls these torch collectives by their deprecated names on every step, and
        # other libraries' warning filters reset Python's once-per-location memory, so each rank
        # printed the same FutureWarning thousands of times: it says nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                                category=FutureWarning)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def destroy() -> None:
    """Leave the process group together: a barrier first, so no rank closes its connections while a
    peer still uses them (gloo's peer thread then aborts that process: "terminate called without an
    active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def uses_deepspeed(cfg, world_size: int) -> bool:
    """Whether this run goes through DeepSpeed: a ``train.deepspeed`` file, or several ranks."""
    return cfg.train.deepspeed is not None or world_size > 1


def zero3_planned(cfg, world_size: int) -> bool:
    """Whether this run will shard the policy (and so the reference) with ZeRO-3."""
    if not uses_deepspeed(cfg, world_size):
        return False
    if cfg.train.deepspeed is None:
        return True  # the bundled configs/zero3.json
    from ..config import deepspeed_config

    ds = deepspeed_config(cfg, world_size)  # validates the file (ConfigError naming it)
    return ds.get("zero_optimization", {}).get("stage", 0) == 3


class PlainEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: Optional[float]):
        self.module, self.optimizer, self.scheduler, self.max_grad_norm = model, optimizer, scheduler, max_grad_norm
        self.world_size = 1

    def head_gathered(self):
        return contextlib.nullcontext()

    def begin_forward(self) -> None:
        pass

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    def micro_step(self) -> None:  # DeepSpeed steps per micro-batch; plain PyTorch once per step
        pass

    def clip_and_check(self, losses_finite: torch.Tensor, weight_sums: Optional[tuple] = None) -> tuple:
        """Normalise, clip, and read whether every micro-batch's loss (``losses_finite``, a device
        boolean) and the gradient norm are finite: the one host read of a step. ``weight_sums``:
        ``(sum of the step's raw pair weights (device scalar), their count)`` for the step-wide
        ``batch_mean`` normalisation: the accumulated gradients are multiplied by count / sum.
        Returns (gradient norm before clipping, finite, the scale applied (a device scalar) or None)."""
        scale = None
        if weight_sums is not None:
            w_sum, count = weight_sums
            scale = (count / w_sum.clamp(min=1e-12)).float()  # a device scalar: no host read
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm or float("inf"))
        return gnorm, bool(torch.isfinite(gnorm) & losses_finite), scale  # the one host sync of a step

    def step(self) -> None:
        self.optimizer.step()

    def skip(self) -> None:
        pass

    def end_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, d: str, is_main: bool) -> dict:
        if is_main:
            self.module.save_pretrained(os.path.join(d, "model"))
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, d: str, state: dict, load_weights: Callable) -> None:
        load_weights(self.module, os.path.join(d, "model"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, path: str, is_main: bool) -> None:
        if is_main:
            self.module.save_pretrained(path)

    def reset_fetch_trace(self) -> None:  # nothing is fetched: parameters are whole
        pass

    def release_leftovers(self) -> None:
        pass


class DeepSpeedEngine:
    """ZeRO-3 (or any stage) through ``deepspeed.initialize`` with the config of ``train.deepspeed``.

    The optimiser is DeepSpeed's AdamW with ``torch_adam`` (the same update as torch.optim.AdamW),
    the schedule is the trainer's LambdaLR, gradient clipping comes from ``train.max_grad_norm``.

    One optimiser step: ``backward`` on every micro-batch (always: ZeRO's gradient reduction is
    collective), ``micro_step`` after each but the last (DeepSpeed's non-boundary ``engine.step()``,
    which only counts), then ``clip_and_check`` decides once for the whole step, on every rank alike,
    whether every micro-batch's loss on every rank and the accumulated gradient norm are finite (one
    all-reduced flag, one host read), and ``step`` takes DeepSpeed's boundary ``engine.step()`` or
    ``skip`` takes it with the optimiser's update replaced by discarding the accumulated gradients,
    DeepSpeed's own overflow path: micro_steps, global_steps, global_samples and skipped_steps
    advance on every rank as after a skipped fp16 step, the next step starts a fresh accumulation
    window, and the learning-rate schedule advances as on the plain engine (it counts steps,
    skipped ones too).
    """

    def __init__(self, model: nn.Module, ds_config: dict, lr: float, weight_decay: float, lr_lambda: Callable[[int], float]):
        from ..extras import require

        deepspeed = require("deepspeed")
        cfg = dict(ds_config)
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999],
                                                                 "eps": 1e-8, "torch_adam": True}})
        cfg.setdefault("steps_per_print", 10 ** 12)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        self.module = self.engine.module
        self.world_size = world_size()
        self.zero3 = cfg.get("zero_optimization", {}).get("stage", 0) == 3
        self._check_internals(cfg)

    # the DeepSpeed optimiser internals the step-wide finite check and the skip use, per ZeRO stage
    _INTERNALS = {3: ("_get_norm_groups", "_pre_step", "_partition_all_parameters", "_overflow_clean_up", "loss_scale"),
                  1: ("scaled_global_norm", "loss_scale", "zero_grad", "_wait_for_offload_copies",
                      "_release_preflattened_grad_buffers", "reset_cpu_buffers", "averaged_gradients")}
    _INTERNALS[2] = _INTERNALS[1]

    def _check_internals(self, cfg: dict) -> None:
        """Refuse at start-up what the non-finite handling cannot serve (instead of failing at the
        first non-finite step, possibly hours in): fp16 (its dynamic loss scale is DeepSpeed's to
        manage) and an optimiser without the internals used (another DeepSpeed version, or the
        BF16_Optimizer DeepSpeed picks for stage 1 with fp32 gradient accumulation)."""
        if cfg.get("fp16", {}).get("enabled"):
            raise ValueError("DeepSpeed fp16 is not supported by the trainer (non-finite steps are decided and skipped by it, "
                             "not by DeepSpeed's dynamic loss scale): use bf16 or fp32")
        stage = self.engine.zero_optimization_stage()
        missing = [a for a in self._INTERNALS.get(stage, ()) if not hasattr(self.engine.optimizer, a)]
        if missing:
            import deepspeed

            raise RuntimeError(f"DeepSpeed {deepspeed.__version__}, ZeRO stage {stage}: the optimiser "
                               f"{type(self.engine.optimizer).__name__} lacks {missing}, which the trainer's non-finite "
                               "step handling uses; use ZeRO stage 3 (configs/zero3.json) or the DeepSpeed version "
                               "in pyproject.toml")

    def begin_forward(self) -> None:
        """What ``engine.forward`` does first, for the trainer's direct call of the decoder: the ZeRO
        optimiser counts the previous backward as a finished micro-step (without this ZeRO's
        micro-step id stays 0 and every micro-batch's gradient partition overwrites the previous one
        instead of accumulating: only the last micro-batch of a step counted); ZeRO-3's fetch trace."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self.engine.optimizer, ZeROOptimizer):
            self.engine.optimizer.clear_backward_seen_flag()  # idempotent until the next backward
        if self.zero3:
            reset_zero3_trace(self.engine)

    def head_gathered(self):
        return gathered(lm_head_of(self.module).parameters())

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def micro_step(self) -> None:
        """After a micro-batch that is not the step's last: DeepSpeed's micro-step count."""
        if self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"DeepSpeed is at its accumulation boundary at micro-step {self.engine.micro_steps}, "
                               "before the trainer's step ends: their counts disagree")
        self.engine.step()  # not a boundary: counts the micro-step, nothing else

    def _grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the step's accumulated gradients, as a device tensor, computed the way
        DeepSpeed's optimiser step computes it (collective: every rank calls it). Non-finite (or
        DeepSpeed's -1 sentinel for one) when any gradient is non-finite."""
        opt, stage = self.engine.optimizer, self.engine.zero_optimization_stage()
        if stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            return combine_grad_norm_groups(opt._get_norm_groups()).reshape(())
        if stage in (1, 2):
            return opt.scaled_global_norm().reshape(()) / opt.loss_scale
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]  # stage 0: all-reduced at the boundary
        if not grads:
            raise RuntimeError("DeepSpeed (ZeRO stage 0): no gradients to check at the accumulation boundary")
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def clip_and_check(self, losses_finite: torch.Tensor, weight_sums: Optional[tuple] = None) -> tuple:
        """(gradient norm before clipping, whether this step is finite on every rank, the
        normalisation scale or None). DeepSpeed clips in its step; this decides, before it, from every
        micro-batch's loss on every rank (``losses_finite``, this rank's device boolean) and the global
        gradient norm. ``weight_sums``: ``(this rank's sum of the step's raw pair weights, their
        count)``; summed over the ranks, they give the step-wide ``batch_mean`` scale count / sum,
        which :meth:`step` applies to the accumulated gradients (as DeepSpeed's own loss-scale
        division, before its clipping). One all-reduce and one host read for all of it."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"DeepSpeed is not at its accumulation boundary at micro-step {self.engine.micro_steps}, "
                               "where the trainer's step ends: their counts disagree")
        gnorm = self._grad_norm().float()
        bad = (~(losses_finite & torch.isfinite(gnorm) & (gnorm >= 0))).to(torch.float64).reshape(1)
        w_sum, count = weight_sums if weight_sums is not None else (torch.zeros((), dtype=torch.float64, device=bad.device), 0)
        packed = torch.cat([bad, w_sum.to(torch.float64).reshape(1), torch.full((1,), float(count), dtype=torch.float64, device=bad.device)])
        if self.world_size > 1:
            dist.all_reduce(packed)  # non-finite ranks counted; the norm is global already
        n_bad, total, n = packed.tolist()  # the one host read of a step
        scale = None
        if weight_sums is not None:
            scale = n / max(total, 1e-12)
            gnorm = gnorm * scale  # the norm DeepSpeed clips: of the normalised gradients
            self._pending_scale = scale
        return gnorm, n_bad == 0, scale

    _pending_scale: Optional[float] = None

    def check_step_normalisation(self) -> None:
        """Refuse at start-up what :meth:`step` cannot scale: DeepSpeed without ZeRO whose optimiser
        keeps its own fp32 gradient copies (bf16)."""
        if self.engine.zero_optimization_stage() == 0 and hasattr(self.engine.optimizer, "clear_hp_grads"):
            raise ValueError("meta.normalize=batch_mean under DeepSpeed without ZeRO (stage 0) with bf16: the step-wide "
                             "normalisation cannot scale that optimiser's gradient copies; use ZeRO stage 1-3 or meta.normalize=none")

    def step(self) -> None:
        """DeepSpeed's boundary step: clip, optimiser and scheduler step, gradients cleared. A
        step-wide normalisation scale from :meth:`clip_and_check` multiplies the accumulated
        gradients first: under ZeRO as the optimiser's loss scale for this one step (ZeRO divides
        the gradient partitions and their norm by it before clipping), without ZeRO on ``p.grad``."""
        scale, self._pending_scale = self._pending_scale, None
        if scale is None:
            self.engine.step()
            return
        opt = self.engine.optimizer
        if self.engine.zero_optimization_stage() == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, scale)
            self.engine.step()
            return
        prev = opt.loss_scale
        opt.loss_scale = prev / scale
        try:
            self.engine.step()
        finally:
            opt.loss_scale = prev

    def skip(self) -> None:
        """DeepSpeed's boundary step with the update replaced by discarding the accumulated gradients
        (on every rank: the decision is all-reduced). ``engine.step()`` still runs, so DeepSpeed's
        counters advance exactly as after its own skipped (fp16 overflow) step; then the schedule."""
        self._pending_scale = None  # the step's normalisation is dropped with its gradients
        opt = self.engine.optimizer
        had_overflow = "overflow" in vars(opt)
        prev = getattr(opt, "overflow", False)

        def discard(*args, **kwargs):
            self._discard_accumulated()
            opt.overflow = True  # read by engine._take_model_step: counts a skipped step, no scheduler step

        opt.step = discard  # an instance attribute: shadows the optimiser's step for this one call
        try:
            self.engine.step()
        finally:
            del opt.step
            if had_overflow:
                opt.overflow = prev
            else:
                opt.__dict__.pop("overflow", None)
        self.scheduler.step()

    def _discard_accumulated(self) -> None:
        """The accumulated gradients dropped as the ZeRO optimisers drop them on an overflow."""
        opt, stage = self.engine.optimizer, self.engine.zero_optimization_stage()
        if stage == 3:
            opt._pre_step()  # micro-step id, epilogue flag, fetch coordinator, gradient buckets
            opt._partition_all_parameters()
            opt._overflow_clean_up(opt.loss_scale)  # parameter grads, partitioned (or offloaded) accumulators
            opt._global_grad_norm = float("nan")
        elif stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            opt.micro_step_id = INITIAL_MICRO_STEP_ID
            opt._wait_for_offload_copies()
            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            if opt.cpu_offload:
                opt._offload_accumulated_param_ids = set()
                opt.reset_cpu_buffers()
            else:
                for k in opt.averaged_gradients.keys():
                    opt.averaged_gradients[k] = None
                    opt.all_grad_tensors[k] = None
            opt._global_grad_norm = float("nan")
        else:
            if hasattr(opt, "clear_hp_grads"):  # bf16 without ZeRO: fp32 gradient accumulators
                opt.clear_hp_grads()
            for p in self.module.parameters():
                p.grad = None

    def end_step(self) -> None:
        pass

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def _gathered_all(self):
        return gathered(self.module.parameters())

    def save(self, d: str, is_main: bool) -> dict:
        self.engine.save_checkpoint(os.path.join(d, "deepspeed"), tag="state")  # optimizer + ZeRO partitions, collective
        self.save_pretrained(os.path.join(d, "model"), is_main)
        return {}

    def load(self, d: str, state: dict, load_weights: Callable) -> None:
        path, _ = self.engine.load_checkpoint(os.path.join(d, "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint under {os.path.join(d, 'deepspeed')}")

    def save_pretrained(self, path: str, is_main: bool) -> None:
        with self._gathered_all():  # collective: every rank takes part, rank 0 writes
            if is_main:
                first: dict[int, str] = {}  # tied parameters (lm_head = embed_tokens) are saved once, as HF does
                tied = {n for n, p in self.module.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
                state = {k: v.detach().clone() for k, v in self.module.state_dict().items() if k not in tied}
                self.module.save_pretrained(path, state_dict=state)

    def reset_fetch_trace(self) -> None:
        """ZeRO-3's fetch trace restarted, for a forward that is not a training micro-batch's (the
        meta pass's): unlike :meth:`begin_forward` it does not count a micro-step."""
        if self.zero3:
            reset_zero3_trace(self.engine)

    def release_leftovers(self) -> None:
        """After a backward that is not ``engine.backward`` (the meta pass's): ZeRO-3 releases what
        it left gathered, as DeepSpeed's backward epilogue does."""
        if self.zero3:
            release_zero3_leftovers(self.engine)


class ShardedReference:
    """The frozen reference model under DeepSpeed ZeRO-3, sharded like the policy: an inference-only
    engine (no optimiser) built from the policy's DeepSpeed config, with ``offload_param`` to the
    CPU when ``offload_cpu``. Its forwards are collective (every rank runs the same ones, as for the
    policy). ``head()`` gathers the LM head's full weight for the fused loss, which reads it directly.
    """

    def __init__(self, ref: nn.Module, ds_config: dict, offload_cpu: bool):
        from ..extras import require

        deepspeed = require("deepspeed")
        self.engine, *_ = deepspeed.initialize(model=ref, config=self.config(ds_config, offload_cpu))
        self.engine.eval()
        self.module = self.engine.module
        self.module._metapo_sharded_ref = self  # found by build_engine and the stratification pass

    @staticmethod
    def config(ds_config: dict, offload_cpu: bool) -> dict:
        """The reference's DeepSpeed config from the policy's: no optimiser, ``offload_param`` to
        the CPU with ``offload_cpu``. Also the ``zero.Init`` config the reference is built under."""
        cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
        zo = dict(cfg.get("zero_optimization", {}))
        if zo.get("stage", 0) != 3:
            raise ValueError(f"ShardedReference needs a ZeRO stage-3 config, got stage {zo.get('stage', 0)}")
        for k in ("offload_optimizer", "overlap_comm", "contiguous_gradients", "reduce_bucket_size"):
            zo.pop(k, None)  # optimiser-side settings: nothing to optimise
        if offload_cpu:
            zo["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        cfg["zero_optimization"] = zo
        return cfg

    def begin_forward(self) -> None:
        reset_zero3_trace(self.engine)

    def head(self):
        return gathered(lm_head_of(self.module).parameters())
