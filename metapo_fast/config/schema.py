"""Run configuration: a typed tree of dataclasses, loaded from YAML plus dotted overrides.

    cfg = load_config("configs/default.yaml", ["loss.beta=0.2", "meta.enabled=false", "train.epochs=2"])
    cfg.validate(world_size)          # again once the process group is up

Every field carries its documentation in ``metadata["doc"]`` (``describe()`` prints them all).
Each section checks its own ranges in ``__post_init__``; :meth:`MetaPOConfig.validate` adds the
checks that involve several sections or the world size. Every error is a :class:`ConfigError`
(a ``ValueError``) whose message names the field, the value and what is allowed.

Values from YAML and from the command line go through the same coercion, driven by the field's
type: ``bool`` accepts true/false/yes/no/on/off/1/0, ``int`` accepts ``"1e4"`` when integral,
``float`` accepts ``"1e-4"`` (which YAML 1.1 reads as a string) and rejects nan/inf,
``Optional[...]`` accepts none/null/~, ``Literal[...]`` must be one of its choices. Unknown keys
are errors that list the closest valid keys.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from ..ops.chunking import DEFAULT_CHUNK_BYTES as _DEFAULT_CHUNK_BYTES
from .tree import ConfigError
from .tree import bad_value as _bad

__all__ = ["MODE_DEPENDENT", "check_applicable", "ModelConfig", "TinyModelConfig", "DataConfig", "SyntheticConfig", "LossConfig", "TrackerConfig",
           "MetaConfig", "TrainConfig", "MetaPOConfig"]


def _f(default: Any, doc: str) -> Any:
    """A leaf field with its documentation."""
    return field(default=default, metadata={"doc": doc})


def _section(cls: type, doc: str) -> Any:
    """A nested section with its documentation."""
    return field(default_factory=cls, metadata={"doc": doc})


def _check_range(prefix: str, obj: Any, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """Raise unless ``lo <(=) obj.name <(=) hi`` (None = unbounded)."""
    v = getattr(obj, name)
    if v is None and optional:
        return
    ok = v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        if lo is not None and hi is not None:
            what = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        elif lo is not None:
            what = f"{'>' if lo_open else '>='} {lo}"
        elif hi is not None:
            what = f"{'<' if hi_open else '<='} {hi}"
        else:
            what = "finite"
        raise _bad(f"{prefix}.{name}", v, f"must be a number {what}" + (" or null" if optional else ""))


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
@dataclass
class TinyModelConfig:
    """Sizes of the embedded tiny Llama (used when ``model.name_or_path`` is null)."""

    hidden_size: int = _f(64, "Hidden size of the tiny Llama.")
    num_layers: int = _f(2, "Number of decoder layers.")
    num_heads: int = _f(4, "Attention heads; must divide hidden_size.")
    num_kv_heads: int = _f(4, "Key/value heads (grouped-query attention); must divide num_heads.")
    intermediate_size: int = _f(128, "MLP inner size.")
    max_position_embeddings: int = _f(2048, "Longest sequence the tiny model accepts (RoPE: costs no parameters); must be >= data.max_length.")
    tie_word_embeddings: bool = _f(False, "Share the LM head's weight with the input embedding (as Llama-3.2-1B and Qwen2.5-0.5B do).")

    def __post_init__(self) -> None:
        p = "model.tiny"
        for n in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings"):
            _check_range(p, self, n, lo=1)
        if self.hidden_size % self.num_heads:
            raise _bad(f"{p}.num_heads", self.num_heads, f"must divide model.tiny.hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise _bad(f"{p}.num_kv_heads", self.num_kv_heads, f"must divide model.tiny.num_heads={self.num_heads}")


@dataclass
class ModelConfig:
    """Policy / reference model."""

    name_or_path: Optional[str] = _f(None, "Hub id or local directory of the policy (also the reference's starting point); null = the embedded tiny Llama with the character tokenizer of metapo_fast.data.synthetic.")
    ref_name_or_path: Optional[str] = _f(None, "Reference model if it differs from the policy's starting point; null = a frozen copy of the initial policy.")
    tokenizer_name_or_path: Optional[str] = _f(None, "Tokenizer; null = the one of name_or_path (or the character tokenizer for the tiny model).")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the model; null = the default branch.")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "Parameter dtype. bfloat16 for real runs; float32 for the tiny CPU run and exact tests.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "varlen"] = _f("sdpa", "Attention kernel: sdpa (PyTorch), eager, flash_attention_2 (needs flash-attn and bfloat16), varlen (padding-free packed pairs: flash-attn or torch varlen_attn on CUDA, per-sequence SDPA on CPU; metapo_fast.models.varlen).")
    gradient_checkpointing: bool = _f(False, "Recompute decoder-layer activations in backward (less memory, ~30% more compute).")
    use_liger_kernels: bool = _f(False, "Use Liger-Kernel's fused RMSNorm and SwiGLU (any model) and RoPE (Llama attention) in this model instance only, no global patching; CUDA only (metapo_fast.models.liger).")
    ref_offload_cpu: bool = _f(False, "Keep the reference model's weights in CPU memory: under ZeRO-3 DeepSpeed's offload_param on the sharded reference; otherwise each decoder block is streamed to the GPU for its forward (metapo_fast.models.offload). Saves the reference's device memory for host-to-device traffic.")
    tiny: TinyModelConfig = _section(TinyModelConfig, "Sizes of the embedded tiny Llama (ignored when name_or_path is set).")

    def __post_init__(self) -> None:
        for n in ("name_or_path", "ref_name_or_path", "tokenizer_name_or_path", "revision"):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise _bad(f"model.{n}", v, "must be a non-empty string or null")


@dataclass
class SyntheticConfig:
    """The embedded addition task (metapo_fast.data.synthetic), used when ``data.path`` is null."""

    num_pairs: int = _f(2000, "Training pairs generated (before the validation split).")
    num_eval_pairs: int = _f(500, "Clean held-out evaluation pairs.")
    flip_fraction: float = _f(0.3, "Fraction of training pairs whose chosen/rejected are swapped (label noise with known ground truth).")
    ambiguous_fraction: float = _f(0.0, "Fraction of training pairs whose two answers are both wrong (no preference signal); disjoint from the flipped ones.")
    seed: int = _f(0, "Generator seed.")
    oracle_labels: bool = _f(False, "Train on the true labels of the same pairs: flipped pairs swapped back, ambiguous pairs (no true label) removed. The clean-label upper bound of a noisy condition (benchmarks.quality's dpo_oracle).")
    clean_validation: bool = _f(False, "Give the validation pairs their true labels (the task knows which are flipped). The paper's validation split is drawn from the same noisy data; this tests MetaPO when the validation set is clean.")

    def __post_init__(self) -> None:
        p = "data.synthetic"
        _check_range(p, self, "num_pairs", lo=2)
        _check_range(p, self, "num_eval_pairs", lo=0)
        _check_range(p, self, "flip_fraction", 0.0, 1.0)
        _check_range(p, self, "ambiguous_fraction", 0.0, 1.0)
        if self.flip_fraction + self.ambiguous_fraction > 1.0:
            raise _bad(f"{p}.ambiguous_fraction", self.ambiguous_fraction,
                       f"flip_fraction + ambiguous_fraction must be <= 1, flip_fraction={self.flip_fraction}")


@dataclass
class DataConfig:
    """Preference data: source, format, tokenisation, invalid rows, validation split."""

    path: Optional[str] = _f(None, "Hub dataset id, or a local .json/.jsonl/.parquet file; null = the embedded synthetic task.")
    subset: Optional[str] = _f(None, "Hub dataset configuration name (load_dataset's second argument).")
    revision: Optional[str] = _f(None, "Hub dataset revision; part of the tokenisation cache key.")
    split: str = _f("train", "Split of a hub dataset used for training (e.g. train_prefs).")
    eval_path: Optional[str] = _f(None, "Held-out evaluation data (hub id or file); null = the same source as path with eval_split.")
    eval_split: Optional[str] = _f(None, "Split used for held-out evaluation (e.g. test_prefs); null = no held-out set (the synthetic task always has one).")
    format: Literal["auto", "standard", "conversational"] = _f("auto", "TRL data format: standard (strings) or conversational (lists of {role, content} messages); auto = detected from the first rows.")
    prompt_column: str = _f("prompt", "Column holding the prompt (absent = implicit prompt: the shared prefix of chosen and rejected).")
    chosen_column: str = _f("chosen", "Column holding the preferred response.")
    rejected_column: str = _f("rejected", "Column holding the dispreferred response.")
    max_length: int = _f(1024, "Maximum tokens of prompt + response.")
    max_prompt_length: int = _f(512, "Maximum prompt tokens; must be < max_length.")
    truncation: Literal["keep_start", "keep_end", "drop"] = _f("keep_end", "Over-long pairs: keep_end keeps the end of the prompt (next to the response), keep_start its beginning; responses always keep their beginning. drop reports the pair as invalid instead.")
    add_bos: bool = _f(True, "Prepend the tokenizer's BOS token to the prompt when it is not already there.")
    invalid_rows: Literal["drop", "error"] = _f("drop", "Invalid rows: drop them (reported by row and reason, with counts) or fail the run naming the file and rows.")
    val_fraction: float = _f(0.03, "Fraction of the valid pairs held out for the meta-objective (paper: 3%); 0 = none (then meta.enabled must be false).")
    val_split: Literal["stratified", "random"] = _f("stratified", "stratified = quantile bins of the reference log-prob margin logp_ref(y_w) - logp_ref(y_l) (math.md section 6); random = uniform.")
    num_bins: int = _f(10, "Quantile bins of the stratified split.")
    split_seed: int = _f(0, "Seed of the validation split.")
    cache: bool = _f(True, "Cache tokenised data (keyed by data bytes / hub id + revision, tokenizer, lengths and truncation).")
    cache_dir: Optional[str] = _f(None, "Cache directory: tokenised pairs under tokenized/ (null = $METAPO_FAST_CACHE or ~/.cache/metapo_fast), datasets' Arrow files under datasets/ (null = the Hugging Face default).")
    synthetic: SyntheticConfig = _section(SyntheticConfig, "The embedded synthetic task (used when path is null).")

    def __post_init__(self) -> None:
        p = "data"
        _check_range(p, self, "max_length", lo=2)
        _check_range(p, self, "max_prompt_length", lo=1)
        if self.max_prompt_length >= self.max_length:
            raise _bad(f"{p}.max_prompt_length", self.max_prompt_length, f"must be < data.max_length={self.max_length}")
        _check_range(p, self, "val_fraction", 0.0, 0.5, hi_open=True)
        _check_range(p, self, "num_bins", lo=1)
        for n in ("prompt_column", "chosen_column", "rejected_column", "split"):
            if not getattr(self, n):
                raise _bad(f"{p}.{n}", getattr(self, n), "must be a non-empty string")
        if len({self.prompt_column, self.chosen_column, self.rejected_column}) < 3:
            raise _bad(f"{p}.chosen_column", self.chosen_column, "prompt/chosen/rejected columns must be three different names")




@dataclass
class LossConfig:
    """Pairwise loss (metapo_fast.losses / fused_linear_preference_loss arguments)."""

    loss_type: str = _f("sigmoid", "Registered loss: sigmoid (DPO), ipo, focal (FocalPO), simpo, orpo (metapo_fast.losses.LOSSES).")
    beta: float = _f(0.1, "DPO temperature (sigmoid, ipo, focal) / SimPO's reward scale.")
    label_smoothing: float = _f(0.0, "eps in [0, 0.5): conservative DPO's label smoothing (loss_type=sigmoid) or rDPO's assumed flip rate (loss_type=robust); other losses refuse it.")
    focal_gamma: float = _f(1.0, "FocalPO exponent gamma >= 0.")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin.")
    orpo_lambda: float = _f(0.1, "Weight of ORPO's odds-ratio term.")
    chunk_bytes: int = _f(_DEFAULT_CHUNK_BYTES, "Logits memory budget per chunk of the fused loss (policy + reference logits), bytes: a ceiling on "
                                   "one chunk, never a cause of recomputation (longer pairs are streamed; on CUDA a whole pair "
                                   "that fits the free memory gets one chunk). README, 'How the fused loss works'.")
    backend: Literal["auto", "torch", "triton", "cpp"] = _f("auto", "Fused-loss implementation: auto = Triton on CUDA, C++ on CPU, else the PyTorch reference.")

    def __post_init__(self) -> None:
        from ..losses import LOSSES

        if self.loss_type not in LOSSES:
            close = difflib.get_close_matches(str(self.loss_type), list(LOSSES), n=3)
            raise _bad("loss.loss_type", self.loss_type, f"must be one of {sorted(LOSSES)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        _check_range("loss", self, "beta", lo=0.0, lo_open=True)
        _check_range("loss", self, "label_smoothing", 0.0, 0.5, hi_open=True)
        _check_range("loss", self, "focal_gamma", lo=0.0)
        _check_range("loss", self, "simpo_gamma")
        _check_range("loss", self, "orpo_lambda", lo=0.0)
        _check_range("loss", self, "chunk_bytes", lo=1)
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise _bad("loss.label_smoothing", self.label_smoothing,
                       f"applies to loss_type='sigmoid' (cDPO) and 'robust' (rDPO's flip rate) only, not {self.loss_type!r}; set it to 0")

    @property
    def needs_reference(self) -> bool:
        from ..losses import get_loss

        return get_loss(self.loss_type).needs_reference

    def to_loss_params(self):
        """The :class:`metapo_fast.losses.LossParams` of this section."""
        from ..losses import LossParams

        return LossParams(beta=self.beta, label_smoothing=self.label_smoothing, focal_gamma=self.focal_gamma,
                          simpo_gamma=self.simpo_gamma, orpo_lambda=self.orpo_lambda)


@dataclass
class TrackerConfig:
    """Per-pair temporal statistics (math.md section 3)."""

    alpha: float = _f(0.9, "EMA decay of the temporal features, in (0, 1) (paper: 0.9).")

    def __post_init__(self) -> None:
        _check_range("tracker", self, "alpha", 0.0, 1.0, lo_open=True, hi_open=True)


@dataclass
class MetaConfig:
    """Meta-weight network and its bilevel update (math.md sections 4-5)."""

    enabled: bool = _f(True, "Learn per-pair weights (MetaPO); false = the plain base loss.")
    interval: int = _f(100, "K: meta-update every K training steps (paper: 100).")
    start_fraction: float = _f(1 / 3, "No meta-update before this fraction of the run's steps (step round(fraction * total steps); 0 = from step K, the paper's): phi keeps its initialisation, every weight 1, until the margins carry the signal (they flag flipped pairs only late in training, benchmarks/results/weights_diagnosis_detectors.md). A third beat 0 in every noisy condition of the quality benchmark (meta_ablation.md run 8) and takes a third of the meta-updates' cost off. The step is fixed when the run starts and saved in its checkpoints (a resume that changes the run length keeps it). Not in the paper.")
    lambda_margin: float = _f(0.1, "lambda of L_meta = L_val + lambda * L_margin (paper: 0.1).")
    entropy_coef: float = _f(0.0, "Coefficient of a weight-entropy bonus in L_meta (0 = off, the paper's objective).")
    arch: Literal["linear", "mlp"] = _f("linear", "Meta-network: linear (7 parameters, paper default) or mlp (6-mlp_hidden-1).")
    mlp_hidden: int = _f(32, "Hidden width of the mlp meta-network.")
    features: Literal["all", "no_margin", "no_volatility", "no_reference", "no_temporal"] = _f("all", "Feature subset (paper Table 6 ablations); no_reference drops the KL features.")
    lr: float = _f(0.003, "Meta learning rate on phi (its step is on dL_meta/dphi per unit of the lookahead's eta). The paper uses 1e-4, which math.md section 4 measured to leave phi unchanged; 0.003 learns and beat 0.03 in every condition of the quality benchmark (benchmarks/results/quality.md).")
    optimizer: Literal["adam", "sgd"] = _f("adam", "Optimiser on phi: adam (per coordinate, the paper's) or sgd (momentum 0.9 on the L2-normalised meta-gradient: each update adds meta.lr along it to the momentum, so a feature that carries little of the signal moves little).")
    val_objective: Literal["log", "sigmoid"] = _f("sigmoid", "L_val's per-pair loss: sigmoid (sigma(-z), the expected ranking error: bounded, so confidently misranked, i.e. mislabelled, validation pairs do not dominate the meta-gradient; the default since the quality benchmark measured it level with or above log in 4 of 5 conditions) or log (-log sigma(z), the paper's).")
    preconditioner: Literal["none", "adam"] = _f("none", "Inner preconditioner of the lookahead in c_i: none = <g_meta, g_i> (an SGD step, math.md section 5) or adam = <g_meta, P g_i> with P the policy AdamW's diagonal 1 / (sqrt(v_hat) + eps) (the step Adam takes, its momentum left out; math.md section 5a). adam needs train.optimizer=adamw and the plain (non-DeepSpeed) engine, whose optimiser state is whole on every rank.")
    weighting: Literal["learned", "ema_margin", "static_filter"] = _f("learned", "learned: MetaPO's meta-network, updated every K steps; ema_margin: the learned-free baseline w = sigmoid(meta.kappa * normalised EMA of the margin), normalised to mean 1 (nothing is meta-learned); static_filter: paper App. A.8's static filtering, every pair weighs 1 until step meta.filter_after_steps, then the meta.filter_fraction of training pairs with the lowest policy margin are dropped (weight 0) for the rest of the run.")
    kappa: float = _f(2.0, "Sharpness of the ema_margin baseline's sigmoid, on the normalised EMA of the margin.")
    filter_after_steps: int = _f(200, "static_filter: the step after which the margins of all training pairs are computed once and the lowest are dropped (a short DPO warm-up).")
    filter_fraction: float = _f(0.2, "static_filter: fraction of training pairs dropped (those with the lowest margin), in (0, 1).")
    filter_weight: float = _f(0.0, "static_filter: the weight the filtered pairs keep, before normalisation, in [0, 1): 0 drops them (the paper's filter); between 0 and 1 down-weights them (how sharp a weighting must be: with meta.filter_by=oracle it is the ceiling of a soft weighting with a perfect detector).")
    filter_by: Literal["margin", "prompt_margin", "oracle"] = _f("margin", "static_filter: which pairs are dropped at meta.filter_after_steps. margin: the meta.filter_fraction with the lowest policy margin (paper App. A.8); prompt_margin: the same fraction with the lowest margin minus the mean margin of their prompt's pairs (pairs with identical prompts), so a hard prompt does not lose all its pairs; oracle: exactly the pairs the training set marks is_flipped (a diagnostic, not a method: the ceiling of any detector that acts from that step on; needs an is_flipped column, as the synthetic task has).")
    feature_norm: Literal["rms", "standardize"] = _f("rms", "Feature normalisation of the meta-network: rms (divide by the running RMS; keeps signs) or standardize (subtract the running mean, divide by the running standard deviation).")
    normalize: Literal["auto", "none", "batch_mean"] = _f("auto", "Weight normalisation: batch_mean divides by the batch mean; auto = batch_mean when train.optimizer is adaptive (adamw), none otherwise (math.md section 4).")
    inner_lr_for_lookahead: Optional[float] = _f(None, "eta of the one-step lookahead; null = train.lr.")
    val_batch_size: int = _f(64, "Validation pairs per meta-update (all ranks together).")
    stats_momentum: float = _f(0.99, "Momentum of the feature-scale EMA of the meta-network.")

    def __post_init__(self) -> None:
        p = "meta"
        _check_range(p, self, "interval", lo=1)
        _check_range(p, self, "start_fraction", 0.0, 1.0, hi_open=True)
        _check_range(p, self, "lambda_margin", lo=0.0)
        _check_range(p, self, "entropy_coef", lo=0.0)
        _check_range(p, self, "mlp_hidden", lo=1)
        _check_range(p, self, "lr", lo=0.0, lo_open=True)
        _check_range(p, self, "filter_after_steps", lo=1)
        _check_range(p, self, "filter_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        _check_range(p, self, "filter_weight", 0.0, 1.0, hi_open=True)
        _check_range(p, self, "inner_lr_for_lookahead", lo=0.0, lo_open=True, optional=True)
        _check_range(p, self, "val_batch_size", lo=1)
        _check_range(p, self, "stats_momentum", 0.0, 1.0, hi_open=True)
        _check_range(p, self, "kappa", lo=0.0, lo_open=True)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and run control."""

    output_dir: str = _f("runs/metapo", "Run directory (config, logs, checkpoints).")
    epochs: int = _f(3, "Passes over the training pairs (paper: 3 for UltraFeedback, 2 for HH-RLHF).")
    max_steps: Optional[int] = _f(None, "Stop after this many optimiser steps; null = epochs decide.")
    per_device_batch_size: int = _f(8, "Pairs per rank per micro-step (2x sequences).")
    grad_accum: Optional[int] = _f(None, "Micro-steps per optimiser step; null = 1, or global_batch_size / (per_device_batch_size * world_size).")
    global_batch_size: Optional[int] = _f(None, "Pairs per optimiser step over all ranks; must be divisible by per_device_batch_size * world_size. null = per_device_batch_size * world_size * grad_accum.")
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "Inner optimiser of the policy.")
    lr: float = _f(5e-7, "Peak policy learning rate.")
    weight_decay: float = _f(0.0, "Decoupled weight decay.")
    warmup_ratio: float = _f(0.1, "Fraction of the steps with linear warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "Decay after warm-up.")
    max_grad_norm: Optional[float] = _f(1.0, "Gradient-norm clipping; null = none.")
    seed: int = _f(0, "Seed of model init, shuffling and dropout.")
    sync_step_timing: bool = _f(False, "Wait for the GPU at the end of every step, so that step_time_s includes the step's queued GPU work (the optimiser's); for benchmarks: one more host sync per step.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = CUDA when available.")
    eval_every: int = _f(100, "Evaluate every N steps (0 = only at the end).")
    log_every: int = _f(10, "Log every N steps.")
    save_every: int = _f(500, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept (older ones are deleted).")
    resume: Optional[str] = _f(None, "Checkpoint directory to resume from, or 'auto' = the newest valid checkpoint in output_dir if any.")
    sft_warmup_steps: int = _f(0, "SFT steps on the synthetic task's correct answers before the reference is frozen (embedded tiny model only).")
    sft_lr: float = _f(1e-3, "Learning rate of the SFT warm-up.")
    deepspeed: Optional[str] = _f(None, "DeepSpeed JSON config (e.g. configs/zero3.json); relative to the working directory, else to the YAML file. Its 'auto' values are filled from this config.")
    max_consecutive_nonfinite: int = _f(3, "Abort after this many consecutive steps with a non-finite loss or gradient (each one is skipped).")
    dist_timeout_s: float = _f(1800.0, "Timeout of collective operations, seconds (a dead rank fails the others after this long).")

    def __post_init__(self) -> None:
        p = "train"
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise _bad(f"{p}.output_dir", self.output_dir, "must be a non-empty path")
        _check_range(p, self, "epochs", lo=1)
        _check_range(p, self, "max_steps", lo=1, optional=True)
        _check_range(p, self, "per_device_batch_size", lo=1)
        _check_range(p, self, "grad_accum", lo=1, optional=True)
        _check_range(p, self, "global_batch_size", lo=1, optional=True)
        _check_range(p, self, "lr", lo=0.0, lo_open=True)
        _check_range(p, self, "weight_decay", lo=0.0)
        _check_range(p, self, "warmup_ratio", 0.0, 1.0, hi_open=True)
        _check_range(p, self, "max_grad_norm", lo=0.0, lo_open=True, optional=True)
        for n in ("eval_every", "save_every", "sft_warmup_steps"):
            _check_range(p, self, n, lo=0)
        _check_range(p, self, "log_every", lo=1)
        _check_range(p, self, "keep_checkpoints", lo=1)
        _check_range(p, self, "sft_lr", lo=0.0, lo_open=True)
        _check_range(p, self, "max_consecutive_nonfinite", lo=1)
        _check_range(p, self, "dist_timeout_s", lo=0.0, lo_open=True)
        if self.resume is not None and not self.resume.strip():
            raise _bad(f"{p}.resume", self.resume, "must be a checkpoint path, 'auto' or null")

    def resolved_grad_accum(self, world_size: int = 1) -> int:
        """Micro-steps per optimiser step on ``world_size`` ranks (checks divisibility)."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size is None:
            return self.grad_accum or 1
        if self.global_batch_size % per_step:
            raise _bad("train.global_batch_size", self.global_batch_size,
                       f"must be divisible by train.per_device_batch_size * world_size = {self.per_device_batch_size} * {world_size} = {per_step}")
        accum = self.global_batch_size // per_step
        if self.grad_accum is not None and self.grad_accum != accum:
            raise _bad("train.grad_accum", self.grad_accum,
                       f"contradicts train.global_batch_size={self.global_batch_size} = {self.per_device_batch_size} per device * {world_size} ranks * {accum}; set it to {accum} or null")
        return accum

    def resolved_global_batch(self, world_size: int = 1) -> int:
        """Pairs per optimiser step over all ranks."""
        return self.per_device_batch_size * world_size * self.resolved_grad_accum(world_size)


@dataclass
class MetaPOConfig:
    """Root of the configuration tree."""

    model: ModelConfig = _section(ModelConfig, "Policy and reference model.")
    data: DataConfig = _section(DataConfig, "Preference data.")
    loss: LossConfig = _section(LossConfig, "Pairwise loss.")
    tracker: TrackerConfig = _section(TrackerConfig, "Temporal feature tracker.")
    meta: MetaConfig = _section(MetaConfig, "Meta-weight network.")
    train: TrainConfig = _section(TrainConfig, "Optimisation and run control.")

    KL_FEATURES: ClassVar[tuple[str, ...]] = ("kl", "ema_kl")

    def __post_init__(self) -> None:
        self.validate(world_size=1, check_files=False)

    @property
    def meta_normalize(self) -> str:
        """``meta.normalize`` with ``auto`` resolved: batch_mean for adaptive inner optimisers."""
        if self.meta.normalize != "auto":
            return self.meta.normalize
        return "batch_mean" if self.train.optimizer == "adamw" else "none"

    @property
    def lookahead_lr(self) -> float:
        """eta of the meta-gradient's one-step lookahead."""
        return self.meta.inner_lr_for_lookahead if self.meta.inner_lr_for_lookahead is not None else self.train.lr

    def validate(self, world_size: int = 1, check_files: bool = True) -> None:
        """Checks that involve several sections or the world size; raises :class:`ConfigError`.

        The sections' own checks run again too (fields may have been assigned after construction).
        ``check_files`` also checks that a DeepSpeed config exists and agrees with this config.
        """
        for sec in (self.model, self.model.tiny, self.data, self.data.synthetic, self.loss, self.tracker, self.meta, self.train):
            sec.__post_init__()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size={world_size!r} is invalid: must be an integer >= 1")
        m, d, t = self.meta, self.data, self.train
        if m.enabled and not self.loss.needs_reference:
            from ..metapo.weight_net import feature_subset

            used = [f for f in feature_subset(m.features) if f in self.KL_FEATURES]
            if used:
                raise _bad("meta.features", m.features,
                           f"uses the KL features {used}, which need a reference model, but loss.loss_type={self.loss.loss_type!r} "
                           "is reference-free; set meta.features=no_reference or use a loss with a reference")
        if d.val_fraction > 0 and d.val_split == "stratified" and not self.loss.needs_reference:
            raise _bad("data.val_split", d.val_split,
                       f"stratifies by the reference model's log-prob margin, but loss.loss_type={self.loss.loss_type!r} "
                       "loads no reference model; set data.val_split=random")
        if m.enabled and d.val_fraction <= 0:
            raise _bad("data.val_fraction", d.val_fraction, "must be > 0 when meta.enabled=true (the meta-objective needs validation pairs)")
        t.resolved_grad_accum(world_size)  # global batch divisible across ranks
        if m.enabled and m.weighting == "learned" and m.preconditioner == "adam":
            if t.optimizer != "adamw":
                raise _bad("meta.preconditioner", m.preconditioner, f"needs train.optimizer='adamw' (its second moments are P), got {t.optimizer!r}")
            if t.deepspeed is not None or world_size > 1:
                raise _bad("meta.preconditioner", m.preconditioner,
                           f"needs the single-process plain engine (train.deepspeed=null, one rank; here train.deepspeed="
                           f"{t.deepspeed!r}, world_size={world_size}): DeepSpeed keeps the optimiser's second moments in its "
                           "own, partitioned state; set meta.preconditioner=none")
        if m.enabled and m.val_batch_size % world_size:
            raise _bad("meta.val_batch_size", m.val_batch_size, f"must be divisible by world_size={world_size} (each rank takes an equal share)")
        if self.model.attn_implementation == "flash_attention_2" and self.model.dtype != "bfloat16":
            raise _bad("model.attn_implementation", "flash_attention_2", f"needs model.dtype='bfloat16', got {self.model.dtype!r}")
        if self.model.name_or_path is None and d.max_length > self.model.tiny.max_position_embeddings:
            raise _bad("data.max_length", d.max_length,
                       f"exceeds model.tiny.max_position_embeddings={self.model.tiny.max_position_embeddings} of the embedded tiny model")
        if t.sft_warmup_steps and d.path is not None:
            raise _bad("train.sft_warmup_steps", t.sft_warmup_steps,
                       f"the SFT warm-up runs on the embedded synthetic task only (data.path=null), got data.path={d.path!r}; "
                       "set it to 0 and start from a model already fine-tuned on your data (it is also the reference)")
        if t.sft_warmup_steps and self.model.name_or_path is not None:
            raise _bad("train.sft_warmup_steps", t.sft_warmup_steps,
                       f"applies to the embedded tiny model only (model.name_or_path=null), got model.name_or_path={self.model.name_or_path!r}; set it to 0")
        if t.deepspeed is not None and check_files:
            from .loading import deepspeed_config

            deepspeed_config(self, world_size)


# ------------------------------------------------------------------------------------------------
# Settings that apply in some modes only
# ------------------------------------------------------------------------------------------------
#: key (or ``section.*``) -> (the mode it applies in, as text; whether ``cfg`` is in that mode). A key
#: the user sets (on the command line or in their own YAML) for another alternative of a choice
#: (model or data source, loss type, meta weighting or architecture) is refused by
#: :func:`check_applicable` instead of being silently ignored. The settings of a feature that is
#: switched off are not refused, so that one switch runs a baseline from the same file: ``meta.*``
#: with ``meta.enabled=false``, ``train.sft_lr`` with ``train.sft_warmup_steps=0``.
#: ``train.sft_warmup_steps`` itself is refused by :meth:`MetaPOConfig.validate` whatever set it
#: (the embedded default sets it).
MODE_DEPENDENT: dict[str, tuple[str, Any]] = {
    "model.tiny.*": ("model.name_or_path=null (the embedded tiny Llama)", lambda c: c.model.name_or_path is None),
    "data.synthetic.*": ("data.path=null (the embedded synthetic task)", lambda c: c.data.path is None),
    "loss.focal_gamma": ("loss.loss_type='focal'", lambda c: c.loss.loss_type == "focal"),
    "loss.simpo_gamma": ("loss.loss_type='simpo'", lambda c: c.loss.loss_type == "simpo"),
    "loss.orpo_lambda": ("loss.loss_type='orpo'", lambda c: c.loss.loss_type == "orpo"),
    "meta.mlp_hidden": ("meta.arch='mlp'", lambda c: not c.meta.enabled or c.meta.arch == "mlp"),
    "meta.kappa": ("meta.weighting='ema_margin'", lambda c: not c.meta.enabled or c.meta.weighting == "ema_margin"),
    **{f"meta.{k}": ("meta.weighting='static_filter'", lambda c: not c.meta.enabled or c.meta.weighting == "static_filter")
       for k in ("filter_after_steps", "filter_by", "filter_weight")},
    "meta.filter_fraction": ("meta.weighting='static_filter' and meta.filter_by='margin' or 'prompt_margin'",
                             lambda c: not c.meta.enabled or (c.meta.weighting == "static_filter" and c.meta.filter_by != "oracle")),
    **{f"meta.{k}": ("meta.weighting='learned'", lambda c: not c.meta.enabled or c.meta.weighting == "learned")
       for k in ("interval", "start_fraction", "lambda_margin", "entropy_coef", "arch", "lr", "optimizer", "val_objective", "preconditioner",
                 "inner_lr_for_lookahead", "val_batch_size")},
}


def check_applicable(cfg: "MetaPOConfig", keys) -> None:
    """Refuse (:class:`ConfigError`, one line) each of ``keys`` (dotted, as the user set them) that
    has no effect in ``cfg``'s mode (:data:`MODE_DEPENDENT`)."""
    for key in keys:
        rule = MODE_DEPENDENT.get(key) or MODE_DEPENDENT.get(key.rsplit(".", 1)[0] + ".*")
        if rule is not None and not rule[1](cfg):
            raise ConfigError(f"{key} is set but has no effect here: it applies only with {rule[0]} "
                              f"(remove it, or switch to that mode)")
