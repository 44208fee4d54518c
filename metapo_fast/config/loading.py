"""Loading and saving the configuration: YAML plus dotted overrides in, YAML out, ``describe()``,
the resume fingerprint (which fields may change when a run is resumed), and the DeepSpeed JSON
file checked against the run's settings."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

from . import tree as _tree
from .schema import MetaPOConfig, check_applicable
from .tree import ConfigError, deep_merge, flatten, from_dict, read_yaml
from .tree import bad_value as _bad

__all__ = ["RESUME_MUTABLE_FIELDS", "CONFIG_FILENAME", "load_config", "parse_overrides", "to_dict", "save_yaml",
           "config_fingerprint", "config_diff", "check_resume_compatible", "describe", "deepspeed_config",
           "config_from_argv"]


def parse_overrides(overrides: Sequence[str], schema: Optional[type] = None) -> dict[str, Any]:
    """``["loss.beta=0.2", "meta.enabled=false"]`` -> ``{"loss": {"beta": 0.2}, "meta": {"enabled": False}}``.

    Values are coerced to the field types of ``schema`` (default :class:`MetaPOConfig`); unknown keys
    raise :class:`ConfigError` listing the closest valid keys. A later override of the same key wins.
    """
    return _tree.parse_overrides(overrides, schema or MetaPOConfig)


def describe(schema: Optional[type] = None) -> str:
    """One line per key, ``key (type, default): doc``, grouped by section (for ``--help``)."""
    return _tree.describe(schema or MetaPOConfig)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), user_yaml: bool = True) -> MetaPOConfig:
    """Defaults <- YAML file ``path`` (optional) <- dotted ``overrides``, checked (world size 1).

    The keys the user set (the overrides, and ``path``'s keys when ``user_yaml``; False for the
    embedded default file) must apply in the resulting mode (:func:`check_applicable`).
    Call :meth:`MetaPOConfig.validate` with the real world size once it is known.
    """
    data = read_yaml(path) if path else {}
    try:
        merged = deep_merge(data, parse_overrides(list(overrides)))
        ds = merged.get("train", {}).get("deepspeed") if isinstance(merged.get("train"), Mapping) else None
        if path and isinstance(ds, str) and not os.path.isabs(ds) and not os.path.exists(ds):
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), ds)
            if os.path.exists(beside):  # a path relative to the YAML file
                merged["train"]["deepspeed"] = beside
        cfg = from_dict(MetaPOConfig, merged)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path or 'defaults'}{' + overrides' if overrides else ''})") from None
    cfg.validate(world_size=1, check_files=True)
    explicit = set(flatten(parse_overrides(list(overrides))))
    if path and user_yaml:  # a file's keys at their default value (a saved config.yaml holds every key) set nothing
        defaults = flatten(to_dict(MetaPOConfig()))
        explicit |= {k for k, v in flatten(data).items() if k in defaults and _tree_value(cfg, k) != defaults[k]}
    try:
        check_applicable(cfg, sorted(explicit))
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path or 'defaults'}{' + overrides' if overrides else ''})") from None
    return cfg


def _tree_value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_from_argv(argv: Optional[Sequence[str]] = None) -> MetaPOConfig:
    """``[--config file.yaml] [section.field=value ...]`` (default ``sys.argv[1:]``) -> a checked config.

    ``--help`` prints every key with its type, default and documentation, then exits.
    """
    import argparse

    parser = argparse.ArgumentParser(
        description="metapo_fast run. Overrides: dotted keys, e.g. loss.beta=0.2 meta.enabled=false train.epochs=2",
        epilog="configuration keys:\n" + describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg: MetaPOConfig, path: str) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = "# metapo_fast run configuration (written by metapo_fast.config.save_yaml)\n"
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Resume checks
# ------------------------------------------------------------------------------------------------
# Fields that may change when a run is resumed: paths, run length, intervals, performance knobs that
# do not change the math. Every other field must be equal (config_fingerprint ignores these).
RESUME_MUTABLE_FIELDS = frozenset({
    "train.output_dir", "train.resume", "train.max_steps", "train.log_every", "train.save_every",
    "train.eval_every", "train.keep_checkpoints", "train.dist_timeout_s", "train.max_consecutive_nonfinite",
    "train.device", "train.deepspeed", "data.cache", "data.cache_dir", "model.gradient_checkpointing",
    "model.attn_implementation", "model.use_liger_kernels", "model.ref_offload_cpu", "loss.chunk_bytes",
    "loss.backend", "train.sync_step_timing",
})


CONFIG_FILENAME = "config.yaml"  # the saved config inside a run or checkpoint directory


def _as_flat(cfg: Union[MetaPOConfig, Mapping, str]) -> dict[str, Any]:
    if isinstance(cfg, str):
        path = os.path.join(cfg, CONFIG_FILENAME) if os.path.isdir(cfg) else cfg
        if not os.path.isfile(path):
            raise ConfigError(f"train.resume: no saved config at {path!r}; cannot check that the run matches it")
        cfg = read_yaml(path)
    return flatten(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def config_fingerprint(cfg: Union[MetaPOConfig, Mapping]) -> str:
    """SHA-256 (16 hex digits) of the fields that matter on resume (all but RESUME_MUTABLE_FIELDS)."""
    flat = {k: v for k, v in _as_flat(cfg).items() if k not in RESUME_MUTABLE_FIELDS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(a: Union[MetaPOConfig, Mapping, str], b: Union[MetaPOConfig, Mapping, str],
                ignore: frozenset = RESUME_MUTABLE_FIELDS) -> list[tuple[str, Any, Any]]:
    """``(key, value_in_a, value_in_b)`` for every differing leaf not in ``ignore`` (missing = ``"<absent>"``)."""
    fa, fb = _as_flat(a), _as_flat(b)
    return [(k, fa.get(k, "<absent>"), fb.get(k, "<absent>"))
            for k in sorted(set(fa) | set(fb)) if k not in ignore and fa.get(k, "<absent>") != fb.get(k, "<absent>")]


def check_resume_compatible(saved: Union[MetaPOConfig, Mapping, str], current: MetaPOConfig, where: str = "") -> None:
    """Raise :class:`ConfigError` listing every field that matters and differs between the saved
    config (a config, a mapping, the path of a saved YAML, or a directory holding ``config.yaml``)
    and the current one."""
    diff = config_diff(saved, current)
    if diff:
        src = where or (saved if isinstance(saved, str) else "the checkpoint")
        lines = "; ".join(f"{k}: saved {va!r}, now {vb!r}" for k, va, vb in diff)
        raise ConfigError(f"cannot resume from {src}: its config differs in fields that matter: {lines}. "
                          f"Only {sorted(RESUME_MUTABLE_FIELDS)} may change on resume.")


# ------------------------------------------------------------------------------------------------
# DeepSpeed
# ------------------------------------------------------------------------------------------------
def deepspeed_config(cfg: MetaPOConfig, world_size: int = 1, hidden_size: Optional[int] = None) -> dict:
    """Load ``cfg.train.deepspeed``, check it against ``cfg`` and fill its ``"auto"`` values.

    Filled: ``train_micro_batch_size_per_gpu`` (pairs per rank), ``gradient_accumulation_steps``,
    ``train_batch_size`` (global pairs per step), ``gradient_clipping`` (0 when disabled),
    ``bf16.enabled`` (from model.dtype). ZeRO sizes left at "auto" are set from the model's
    ``hidden_size`` H when given (reduce bucket H^2, stage-3 prefetch bucket 0.9 H^2, persistence
    threshold 10 H: the values the Hugging Face integration uses), else removed so that DeepSpeed's
    own defaults apply. Explicit values that contradict ``cfg`` are errors.
    """
    path = cfg.train.deepspeed
    if path is None:
        raise ConfigError("train.deepspeed is null: no DeepSpeed config to load")
    if not os.path.isfile(path):
        raise _bad("train.deepspeed", path, "file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            ds = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad("train.deepspeed", path, f"not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise _bad("train.deepspeed", path, "must hold a JSON object")
    t = cfg.train
    accum = t.resolved_grad_accum(world_size)
    want = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.per_device_batch_size * world_size * accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise _bad("train.deepspeed", path, f"sets {key}={have!r} but this config implies {value!r} (use \"auto\")")
    bf16 = ds.setdefault("bf16", {})
    want_bf16 = cfg.model.dtype == "bfloat16"
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = want_bf16
    elif bool(bf16["enabled"]) != want_bf16:
        raise _bad("train.deepspeed", path, f"sets bf16.enabled={bf16['enabled']} but model.dtype={cfg.model.dtype!r}")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise _bad("train.deepspeed", path, f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    sized = {} if hidden_size is None else {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key in [k for k, v in zero.items() if v == "auto"]:
        if key in sized:
            zero[key] = sized[key]
        else:
            del zero[key]
    return ds
