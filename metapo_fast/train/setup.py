"""Building a run: tokenizer, policy and reference models, the SFT warm-up of the embedded default,
the train / validation / evaluation data (validation split by the reference margin), the engine
(plain PyTorch or DeepSpeed) and the meta-learner."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import MetaPOConfig
from ..data import PreferenceCollator, PreferenceDataset, TokenizedPairs, build_datasets, load_preference_data
from ..models.hf import (compute_device, copy_partitions, is_checkpointed, is_zero3_partitioned,
                         last_hidden_states, lm_head_of)

log = logging.getLogger(__name__)

__all__ = ["RunData", "Models", "Parallel", "seed_everything", "lr_schedule", "build_models", "build_tokenizer_and_model",
           "sft_warmup", "make_reference", "build_data", "sequence_logps_batched", "build_engine", "make_meta_net",
           "make_meta_learner", "zero3_construction_config", "save_partitioned_pretrained"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(cfg: MetaPOConfig, total_steps: int) -> Callable[[int], float]:
    """The LambdaLR factor of step ``s``: linear warm-up over ``train.warmup_ratio`` of the steps,
    then constant, cosine or linear decay (``train.lr_scheduler``)."""
    t = cfg.train
    warmup, kind = int(t.warmup_ratio * total_steps), t.lr_scheduler

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * prog)) if kind == "cosine" else 1.0 - prog
    return f


@dataclass
class Models:
    """The run's tokenizer, policy and reference (before any DeepSpeed wrapping), and the synthetic
    task when the run uses the embedded one."""

    tok: object
    model: nn.Module
    ref: Optional[nn.Module]
    ref_placement: str
    task: object = None
    ref_streams: list = field(default_factory=list)


def build_models(cfg: MetaPOConfig, dist, run_dir: str, resumed: bool) -> Models:
    """Tokenizer and policy; on the embedded task the SFT warm-up that makes the reference (saved in
    ``run_dir/reference`` so a resumed run starts from the same one); the frozen reference, kept in
    host memory and streamed per block with ``model.ref_offload_cpu`` on one GPU process.

    Several ranks under ZeRO-3 (:func:`zero3_construction_config`): the policy and the reference
    are built partitioned (``deepspeed.zero.Init``: each rank materialises its 1/W of every
    parameter and one module's full parameters at a time), see :func:`_build_models_zero3`."""
    from ..models.offload import stream_reference
    from .parallel import zero3_planned
    from .state import load_hf_weights

    t, device = cfg.train, dist.device
    ds = zero3_construction_config(cfg, dist.world_size)
    tok, model = build_tokenizer_and_model(cfg, device, ds)
    task = None
    if cfg.data.path is None:
        from ..data.synthetic import task_from_config

        task = task_from_config(cfg.data.synthetic)
    if ds is not None:
        return _build_models_zero3(cfg, dist, run_dir, resumed, task, ds, tok, model)
    ref_dir = os.path.join(run_dir, "reference")
    warm = task is not None and t.sft_warmup_steps
    if warm and not resumed:
        sft_warmup(model, tok, task.sft_rows, t.sft_warmup_steps, t.sft_lr, t.seed, device)
    elif warm:  # resumed: the warmed-up start was saved
        load_hf_weights(model, ref_dir)
    ref = make_reference(model, cfg, device)
    placement = "none" if ref is None else ("cpu" if cfg.model.ref_offload_cpu else "device")
    streams = []
    if ref is not None and cfg.model.ref_offload_cpu and device.type != "cpu" and not zero3_planned(cfg, dist.world_size):
        streams = stream_reference(ref, device)  # host-resident, streamed per block
        placement = "cpu, streamed per block"
    if dist.is_main and warm and not resumed:
        model.save_pretrained(ref_dir)  # the run's reference, needed to resume exactly
    return Models(tok, model, ref, placement, task, streams)


def zero3_construction_config(cfg: MetaPOConfig, world_size: int) -> Optional[dict]:
    """The policy's DeepSpeed config when the models are to be built partitioned under
    ``deepspeed.zero.Init``: several ranks and ZeRO stage 3 (``train.deepspeed``, the bundled
    configs/zero3.json by default). ``None`` (built in full, sharded when the engine wraps them) on
    one process, under other stages, with ``model.use_liger_kernels`` (its module swap needs
    full parameters), and with transformers < 5 (the partitioned build uses transformers 5's
    per-module weight initialisation)."""
    import transformers

    from .parallel import zero3_planned

    if world_size <= 1 or cfg.model.use_liger_kernels or not zero3_planned(cfg, world_size):
        return None
    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    from ..config import deepspeed_config

    _default_deepspeed(cfg)
    m = cfg.model
    if m.name_or_path is None:
        hidden = m.tiny.hidden_size
    else:
        from transformers import AutoConfig

        hidden = getattr(AutoConfig.from_pretrained(m.name_or_path, revision=m.revision), "hidden_size", None)
    ds = deepspeed_config(cfg, world_size, hidden_size=hidden)
    want = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    if getattr(torch, m.dtype) != want:
        raise ValueError(f"model.dtype={m.dtype!r}: ZeRO-3 construction builds {want} parameters (DeepSpeed's bf16.enabled); "
                         "use float32 or bfloat16")
    return ds


def _default_deepspeed(cfg: MetaPOConfig) -> None:
    if cfg.train.deepspeed is None:
        from .. import configs

        cfg.train.deepspeed = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "zero3.json")


def build_tokenizer_and_model(cfg: MetaPOConfig, device: torch.device, ds_config: Optional[dict] = None):
    """(tokenizer, policy model). The embedded default is a tiny Llama over the character tokenizer.
    With ``ds_config`` (a ZeRO-3 config) the model is built partitioned over the ranks
    (``deepspeed.zero.Init``; from a config, the values equal a plain build's with the same seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..models.hf import hf_zero3, zero3_init

    m = cfg.model
    dtype = getattr(torch, m.dtype)
    if m.name_or_path is None:
        from ..data.synthetic import build_char_tokenizer

        tok = build_char_tokenizer()
        t = m.tiny
        lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                           num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                           max_position_embeddings=t.max_position_embeddings, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=t.tie_word_embeddings)
        torch.manual_seed(cfg.train.seed)
        if ds_config is None:
            model = LlamaForCausalLM(lcfg).to(dtype)
        else:
            with zero3_init(ds_config):
                model = LlamaForCausalLM(lcfg)
        model.config._attn_implementation = _attn(m.attn_implementation)
    else:
        tok = AutoTokenizer.from_pretrained(m.tokenizer_name_or_path or m.name_or_path, revision=m.revision)
        with hf_zero3(ds_config) if ds_config is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(m.name_or_path, revision=m.revision, dtype=dtype,
                                                         attn_implementation=_attn(m.attn_implementation))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if m.use_liger_kernels:
        if device.type != "cuda":
            raise ValueError("model.use_liger_kernels=true needs a CUDA device (Liger's RMSNorm/SwiGLU are Triton kernels); "
                             f"this run is on {device}")
        from ..models.liger import apply_liger_kernels

        log.info("Liger-Kernel modules swapped in: %s", apply_liger_kernels(model))
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tok, model if ds_config is not None else model.to(device)


def _build_models_zero3(cfg: MetaPOConfig, dist, run_dir: str, resumed: bool, task, ds: dict, tok, model: nn.Module) -> Models:
    """build_models on several ranks under ZeRO-3, ``model`` (the policy) already built partitioned.
    Nothing is ever materialised in full beyond one module at a time (the SFT warm-up's
    checkpoint for resuming aside, gathered one module at a time onto rank 0):

    - the SFT warm-up of the embedded task trains through a temporary DeepSpeed engine (every rank
      the same batches, so the averaged gradient is the one-process gradient), and its partitions
      are copied into a fresh partitioned policy (:func:`~metapo_fast.models.hf.copy_partitions`);
      a resumed run loads the saved start under ``zero.Init`` instead;
    - the reference is loaded under ``zero.Init`` from ``model.ref_name_or_path`` (or
      ``model.name_or_path``), or built empty under ``zero.Init`` and given the policy's
      partitions: a sharded copy instead of ``copy.deepcopy``;
    - it is wrapped right away (``parallel.ShardedReference``): the stratification pass runs it.

    The extra constructions draw no random numbers, so the run's random stream stays that of a
    plain build (the meta-network's initialisation, for one)."""
    from transformers import AutoModelForCausalLM

    from ..losses import get_loss
    from ..models.hf import hf_zero3
    from .parallel import ShardedReference

    t, m, device = cfg.train, cfg.model, dist.device
    dtype = getattr(torch, m.dtype)
    ref_ds = ShardedReference.config(ds, m.ref_offload_cpu)
    ref_dir = os.path.join(run_dir, "reference")
    warm = task is not None and t.sft_warmup_steps

    def load(path: str, config: dict) -> nn.Module:
        with hf_zero3(config):
            return AutoModelForCausalLM.from_pretrained(path, revision=m.revision if path == m.name_or_path else None, dtype=dtype,
                                                        attn_implementation=_attn(m.attn_implementation))

    if warm and not resumed:
        model = _sft_warmup_zero3(model, tok, task.sft_rows, t.sft_warmup_steps, t.sft_lr, t.seed, device, ds, dist.world_size)
        save_partitioned_pretrained(model, ref_dir, dist.is_main)  # the run's reference, needed to resume exactly
    elif warm:  # resumed: the warmed-up start was saved
        start = load(ref_dir, ds)
        copy_partitions(start, model)
        del start
    ref = None
    if get_loss(cfg.loss.loss_type).needs_reference:
        if m.ref_name_or_path:
            ref = load(m.ref_name_or_path, ref_ds)
        elif m.name_or_path and not warm:
            ref = load(m.name_or_path, ref_ds)
        else:
            ref = _empty_like_partitioned(model, ref_ds)
            copy_partitions(model, ref)
        ref.eval().requires_grad_(False)
        ref = ShardedReference(ref, ds, m.ref_offload_cpu).module
    placement = "none" if ref is None else "zero3" + ("+offload_param" if m.ref_offload_cpu else "")
    return Models(tok, model, ref, placement, task, [])


def _empty_like_partitioned(model: nn.Module, ds: dict) -> nn.Module:
    """A model of ``model``'s architecture built partitioned under ``ds`` and left uninitialised
    (no random numbers drawn): the target of a sharded copy."""
    from ..models.hf import zero3_init

    with zero3_init(ds, init_weights=False):
        new = type(model)(copy.deepcopy(model.config))
        new.tie_weights()  # skipped with the initialisation
    if is_checkpointed(model):
        new.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return new


def _sft_warmup_zero3(model: nn.Module, tok, rows: list[dict], steps: int, lr: float, seed: int, device: torch.device,
                      ds: dict, world: int) -> nn.Module:
    """The SFT warm-up of a ZeRO-3-partitioned ``model`` through a temporary DeepSpeed engine
    (AdamW as in :func:`sft_warmup`, no clipping); returns a fresh partitioned model (no engine
    hooks) holding the warmed-up values. Every rank draws the same batches."""
    from .parallel import DeepSpeedEngine

    if steps <= 0:
        return model
    bs = min(32, len(rows))
    c = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    c.update(train_micro_batch_size_per_gpu=bs, gradient_accumulation_steps=1, train_batch_size=bs * world, gradient_clipping=0.0)
    eng = DeepSpeedEngine(model, c, lr, 0.0, lambda s: 1.0)
    sft_warmup(eng.module, tok, rows, steps, lr, seed, device, batch_size=bs, engine=eng)
    eng.engine.empty_partition_cache()
    out = _empty_like_partitioned(model, ds)
    copy_partitions(eng.module, out)
    eng.engine.destroy()
    return out


def save_partitioned_pretrained(model: nn.Module, path: str, is_main: bool) -> None:
    """``save_pretrained`` of a ZeRO-3-partitioned model (collective): one module's parameters
    gathered at a time, copied to the host on rank 0, which writes (tied parameters once)."""
    import deepspeed

    sd, seen = {}, set()
    for mname, mod in model.named_modules():
        params = list(mod.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if is_main:
                for n, p in params:
                    if id(p) not in seen:
                        seen.add(id(p))
                        sd[f"{mname}.{n}" if mname else n] = p.detach().to("cpu", copy=True)
    if is_main:
        model.save_pretrained(path, state_dict=sd)


def _attn(name: str) -> str:
    """transformers' name of an attention choice; "varlen" (padding-free packed pairs) is our own
    kernel, registered with transformers' AttentionInterface (metapo_fast.models.varlen)."""
    if name == "varlen":
        from ..models.varlen import register

        return register()
    return name


def make_reference(model: nn.Module, cfg: MetaPOConfig, device: torch.device) -> Optional[nn.Module]:
    """A frozen reference model: the policy's starting point (or model.ref_name_or_path)."""
    from ..losses import get_loss

    if not get_loss(cfg.loss.loss_type).needs_reference:  # config validation rejects KL features without one
        return None
    if cfg.model.ref_name_or_path:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(cfg.model.ref_name_or_path, dtype=getattr(torch, cfg.model.dtype),
                                                   attn_implementation=_attn(cfg.model.attn_implementation))
    else:
        ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return ref.to("cpu" if cfg.model.ref_offload_cpu else device)


def sft_warmup(model: nn.Module, tok, rows: list[dict], steps: int, lr: float, seed: int, device: torch.device,
               batch_size: int = 32, log_every: int = 50, engine=None) -> list[float]:
    """Supervised warm-up on (prompt, completion) rows: produces the reference model of the
    embedded default (a policy that already prefers the right answers most of the time).
    ``engine``: a DeepSpeedEngine wrapping ``model`` that takes the backward and the step
    (ZeRO-3 construction); otherwise torch's AdamW."""
    if steps <= 0:
        return []
    gen = np.random.default_rng(seed)
    enc = [(tok(r["prompt"], add_special_tokens=False)["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"])
           for r in rows]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if engine is None else None
    head = lm_head_of(model)
    losses = []
    model.train()
    for step in range(steps):
        idx = gen.choice(len(enc), size=min(batch_size, len(enc)), replace=False)
        seqs = [([bos] if bos is not None else []) + enc[i][0] + enc[i][1] + [eos] for i in idx]
        plen = [len(enc[i][0]) + (bos is not None) for i in idx]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, (s, p) in enumerate(zip(seqs, plen)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            labels[r, p - 1:len(s) - 1] = torch.tensor(s[p:])
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        if engine is not None:
            engine.begin_forward()
        h = last_hidden_states(model, ids, mask)
        logits = head(h).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        if engine is not None:
            engine.backward(loss, 1)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("sft warm-up step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def sequence_logps_batched(model: nn.Module, ds: PreferenceDataset, collator: PreferenceCollator, device,
                           batch_size: int = 64, shard: bool = False) -> np.ndarray:
    """``(N, 2)`` float64 sums of response log-probs (chosen, rejected) of every pair of ``ds``.

    ``shard`` (several ranks, each holding the whole model): rank r computes batches r, r + W, ...
    (the same batches as one process, so the same numbers) and one sum all-reduce of the (N, 2)
    rows, each written by one rank, gives every rank all of them: 1/W of the pass per rank.

    A ZeRO-3-sharded reference (``parallel.ShardedReference``'s module) runs collectively: every
    rank runs the same number of forwards (a rank short of batches repeats one and discards it)
    with the LM head gathered."""
    import torch.distributed as tdist

    from ..comm import rank, world_size
    from ..ops.preference_loss import fused_sequence_logps

    world = world_size() if shard else 1
    sharded = getattr(model, "_metapo_sharded_ref", None)
    head = lm_head_of(model)
    out = torch.zeros(len(ds), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    starts = list(range(0, len(ds), batch_size))
    mine = [s for k, s in enumerate(starts) if k % world == (rank() if world > 1 else 0)]
    if sharded is not None and world > 1:  # collective forwards: the same count on every rank
        rounds = -(-len(starts) // world)
        mine = mine + [None] * (rounds - len(mine))
    for s in mine:
        keep = s is not None
        s = s if keep else starts[0]
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        b = collator(items) if keep else collator(items[:1])
        if sharded is not None:
            sharded.begin_forward()
        h = last_hidden_states(model, b["input_ids"].to(device), b["attention_mask"].to(device))
        with sharded.head() if sharded is not None else contextlib.nullcontext():
            lp = fused_sequence_logps(h, head.weight.to(device), b["labels"].to(device),
                                      bias=None if head.bias is None else head.bias.to(device))
        if keep:
            out[s:s + len(items)] = lp.double().reshape(2, -1).t().cpu()
    model.train(was_training)
    if world > 1:
        on = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
        red = out.to(on)
        tdist.all_reduce(red)  # x + 0 = x: exact
        out = red.cpu()
    return out.numpy()


@dataclass
class RunData:
    train: PreferenceDataset
    val: PreferenceDataset
    eval: Optional[PreferenceDataset]
    collator: PreferenceCollator
    train_pairs: TokenizedPairs


def build_data(cfg: MetaPOConfig, tok, ref_model: Optional[nn.Module], device: torch.device, task=None) -> RunData:
    """Load and tokenise the data, split off validation pairs (stratified by the reference model's
    log-prob margin, math.md section 6), and build the held-out evaluation set if any."""
    d = cfg.data
    rows_train = task.train_rows if task is not None else None
    rows_eval = task.eval_rows if task is not None else None
    pairs = load_preference_data(d, tok, "train", rows=rows_train, source_name="synthetic")
    if pairs is None or len(pairs) == 0:
        raise ValueError(f"no valid training pairs in {d.path or 'the synthetic task'}")
    collator = PreferenceCollator(tok.pad_token_id)
    margins = None
    if d.val_fraction > 0 and d.val_split == "stratified":
        if ref_model is None:
            raise ValueError("data.val_split='stratified' needs a reference model (the margin logp_ref(y_w) - logp_ref(y_l)); "
                             "use data.val_split=random with reference-free losses")
        lp = sequence_logps_batched(ref_model, PreferenceDataset(pairs), collator, compute_device(ref_model), shard=True)
        margins = lp[:, 0] - lp[:, 1]
    train, val = build_datasets(pairs, margins, d)
    if task is not None and d.synthetic.clean_validation:
        from ..data.batches import TrueLabels

        val = TrueLabels(val)
    ev = load_preference_data(d, tok, "eval", rows=rows_eval, source_name="synthetic-eval")
    return RunData(train, val, PreferenceDataset(ev) if ev is not None and len(ev) else None, collator, pairs)


@dataclass
class Parallel:
    """Where the policy and reference live once the engine is built (DeepSpeed wraps both)."""

    eng: object
    model: nn.Module
    ref: Optional[nn.Module]
    ref_placement: str
    ref_head: Callable = contextlib.nullcontext  # gathers the reference head where it is sharded (ZeRO-3)
    ref_begin_forward: Callable = lambda: None  # (ZeRO-3) resets the sharded reference's fetch trace


def build_engine(cfg: MetaPOConfig, dist, model: nn.Module, ref: Optional[nn.Module], ref_placement: str,
                 lr_fn: Callable[[int], float]) -> Parallel:
    """Plain PyTorch (AdamW or SGD, LambdaLR) on one process without ``train.deepspeed``; otherwise
    DeepSpeed (the bundled configs/zero3.json by default). Under ZeRO-3 the reference is sharded
    like the policy (``parallel.ShardedReference``). The meta-update runs on the engine's module
    itself (no replica: ``metapo.bilevel``)."""
    from .parallel import DeepSpeedEngine, PlainEngine, ShardedReference, uses_deepspeed

    t = cfg.train
    if not uses_deepspeed(cfg, dist.world_size):
        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.SGD
        kw = {"weight_decay": t.weight_decay} if t.optimizer == "adamw" else {}
        opt = opt_cls(model.parameters(), lr=t.lr, **kw)
        eng = PlainEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_fn), t.max_grad_norm)
        return Parallel(eng, model, ref, ref_placement)
    from ..config import deepspeed_config

    if t.optimizer != "adamw":
        raise ValueError(f"train.optimizer={t.optimizer!r}: the DeepSpeed path supports adamw only")
    _default_deepspeed(cfg)
    ds_cfg = deepspeed_config(cfg, dist.world_size, hidden_size=model.config.hidden_size)
    eng = DeepSpeedEngine(model, ds_cfg, t.lr, t.weight_decay, lr_fn)
    par = Parallel(eng, eng.module, ref, ref_placement)
    if ref is not None and eng.zero3:
        sharded = getattr(ref, "_metapo_sharded_ref", None) or ShardedReference(ref, ds_cfg, cfg.model.ref_offload_cpu)
        par.ref, par.ref_head, par.ref_begin_forward = sharded.module, sharded.head, sharded.begin_forward
        par.ref_placement = "zero3" + ("+offload_param" if cfg.model.ref_offload_cpu else "")
    return par


def make_meta_net(cfg: MetaPOConfig, device: torch.device, num_pairs: int):
    """The weights' network: MetaPO's meta-network, the fixed ema_margin baseline, or the static filter."""
    from ..metapo.weight_net import MarginWeights, MetaWeightNet, PairFilter

    m = cfg.meta
    if m.weighting == "static_filter":
        return PairFilter(num_pairs, m.filter_after_steps, m.filter_fraction, cfg.meta_normalize, m.filter_weight).to(device)
    if m.weighting == "ema_margin":
        return MarginWeights(m.kappa, cfg.meta_normalize, m.stats_momentum, m.feature_norm).to(device)
    return MetaWeightNet(m.arch, m.features, cfg.meta_normalize, m.mlp_hidden, m.stats_momentum, m.feature_norm).to(device)


def make_meta_learner(cfg: MetaPOConfig, net):
    from ..metapo.bilevel import MetaLearner

    m = cfg.meta
    return MetaLearner(net, lr=m.lr, interval=m.interval, lambda_margin=m.lambda_margin, entropy_coef=m.entropy_coef,
                       inner_lr=cfg.lookahead_lr, loss_type=cfg.loss.loss_type, loss_params=cfg.loss.to_loss_params(),
                       backend=cfg.loss.backend, optimizer=m.optimizer, val_objective=m.val_objective,
                       preconditioner=m.preconditioner)
