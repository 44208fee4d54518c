"""metapo_fast.config: YAML + dotted overrides, coercion, start-up checks, configs/, resume fingerprint."""
import dataclasses
import glob
import json
import os
import re

import pytest

from metapo_fast.config import (
    RESUME_MUTABLE_FIELDS, ConfigError, MetaPOConfig, check_resume_compatible, config_diff, config_from_argv,
    config_fingerprint, deepspeed_config, describe, load_config, parse_overrides, save_yaml, to_dict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = cls.__dataclass_fields__[f.name].default_factory if f.default_factory is not dataclasses.MISSING else None
        if tp is not None and dataclasses.is_dataclass(tp):
            yield f"{prefix}{f.name}", f
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_field_is_documented():
    missing = [k for k, f in _leaf_fields(MetaPOConfig) if len(f.metadata.get("doc", "")) < 10]
    assert not missing
    text = describe()
    assert "loss.beta" in text and "meta.interval" in text and "data.synthetic.flip_fraction" in text


def test_overrides_coerce_types():
    cfg = load_config(None, ["loss.beta=0.2", "meta.enabled=false", "train.epochs=2", "train.max_steps=1e3",
                             "meta.lr=1e-4", "data.path=foo.jsonl", "meta.inner_lr_for_lookahead=none",
                             "train.max_grad_norm=null", "model.dtype=bfloat16", "data.max_length=777"])
    assert cfg.loss.beta == 0.2 and isinstance(cfg.loss.beta, float)
    assert cfg.meta.enabled is False
    assert cfg.train.epochs == 2 and cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.meta.lr == 1e-4
    assert cfg.data.path == "foo.jsonl"
    assert cfg.meta.inner_lr_for_lookahead is None and cfg.train.max_grad_norm is None
    assert cfg.model.dtype == "bfloat16" and cfg.data.max_length == 777
    assert parse_overrides(["loss.beta=0.3", "loss.beta=0.4"]) == {"loss": {"beta": 0.4}}


@pytest.mark.parametrize("override, needle", [
    ("loss.bta=1", "loss.beta"),                       # unknown key -> close match
    ("lss.beta=1", "loss.beta"),
    ("beta=0.2", "loss.beta"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("meta.enabled=maybe", "meta.enabled"),
    ("loss.beta=abc", "loss.beta"),
    ("loss.beta=nan", "loss.beta"),
    ("meta.arch=transformer", "meta.arch"),
    ("model.attn_implementation=flash", "flash_attention_2"),
    ("model=3", "model"),
    ("loss.beta", "section.field=value"),
    ("loss.loss_type=dpo", "loss.loss_type"),
    ("train.epochs=null", "train.epochs"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, field", [
    (["loss.loss_type=simpo", "data.val_split=random"], "meta.features"),  # KL features, reference-free loss
    (["loss.loss_type=orpo", "meta.features=no_temporal", "data.val_split=random"], "meta.features"),
    (["loss.loss_type=simpo", "meta.features=no_reference"], "data.val_split"),  # no reference margins
    (["meta.interval=0"], "meta.interval"),                             # K <= 0
    (["meta.interval=-5"], "meta.interval"),
    (["tracker.alpha=0"], "tracker.alpha"),                             # alpha outside (0, 1)
    (["tracker.alpha=1"], "tracker.alpha"),
    (["tracker.alpha=1.5"], "tracker.alpha"),
    (["train.per_device_batch_size=4", "train.global_batch_size=30"], "train.global_batch_size"),
    (["train.per_device_batch_size=4", "train.global_batch_size=16", "train.grad_accum=3"], "train.grad_accum"),
    (["data.max_prompt_length=600", "data.max_length=512"], "data.max_prompt_length"),
    (["data.val_fraction=0"], "data.val_fraction"),                     # meta needs validation pairs
    (["loss.beta=0"], "loss.beta"),
    (["loss.label_smoothing=0.1", "loss.loss_type=ipo"], "loss.label_smoothing"),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation"),  # float32
    (["model.name_or_path=org/model", "train.sft_warmup_steps=10"], "train.sft_warmup_steps"),
    (["data.synthetic.flip_fraction=0.8", "data.synthetic.ambiguous_fraction=0.3"], "data.synthetic.ambiguous_fraction"),
    (["model.tiny.num_heads=3"], "model.tiny.num_heads"),
    (["train.deepspeed=/nonexistent/ds.json"], "train.deepspeed"),
    (["train.warmup_ratio=1"], "train.warmup_ratio"),
    (["meta.preconditioner=adam", "train.optimizer=sgd"], "meta.preconditioner"),  # no second moments
    (["meta.preconditioner=adam", "train.deepspeed=configs/zero3.json"], "meta.preconditioner"),  # partitioned state
])
def test_invalid_combinations_fail_at_startup(overrides, field):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert field in str(e.value)


def test_valid_combinations_pass():
    # reference-free loss is fine without the KL features, or without meta-learning
    load_config(None, ["loss.loss_type=simpo", "meta.features=no_reference", "data.val_split=random"])
    load_config(None, ["loss.loss_type=orpo", "meta.enabled=false", "data.val_fraction=0"])
    load_config(None, ["data.val_fraction=0", "meta.enabled=false"])
    # label smoothing is cDPO's eps (sigmoid) or rDPO's flip rate (robust)
    assert load_config(None, ["loss.loss_type=robust", "loss.label_smoothing=0.3"]).loss.to_loss_params().label_smoothing == 0.3


def test_world_size_divisibility():
    cfg = load_config(None, ["train.per_device_batch_size=4", "train.global_batch_size=32"])
    cfg.validate(world_size=8)
    assert cfg.train.resolved_grad_accum(8) == 1 and cfg.train.resolved_grad_accum(2) == 4
    with pytest.raises(ConfigError, match="train.global_batch_size=32.*4 \\* 3 = 12"):
        cfg.validate(world_size=3)
    cfg = load_config(None, ["meta.val_batch_size=10"])
    with pytest.raises(ConfigError, match="meta.val_batch_size"):
        cfg.validate(world_size=4)
    with pytest.raises(ConfigError, match="world_size"):
        cfg.validate(world_size=0)
    cfg = load_config(None, ["meta.preconditioner=adam"])  # one process: fine; several ranks go through DeepSpeed
    cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="meta.preconditioner.*world_size=2"):
        cfg.validate(world_size=2)


def test_fields_assigned_after_construction_are_rechecked():
    cfg = MetaPOConfig()
    cfg.meta.interval = 0
    with pytest.raises(ConfigError, match="meta.interval"):
        cfg.validate()


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["loss.beta=0.25", "meta.features=no_margin", "train.max_steps=17", "data.path=x.jsonl",
                             "train.global_batch_size=16", "meta.inner_lr_for_lookahead=0.001"])
    path = str(tmp_path / "run" / "config.yaml")
    save_yaml(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert load_config(path, ["loss.beta=0.5"]).loss.beta == 0.5  # overrides win over the file


def test_command_line(capsys):
    path = os.path.join(ROOT, "configs", "default.yaml")
    cfg = config_from_argv(["--config", path, "loss.beta=0.2", "meta.enabled=false", "train.epochs=2"])
    assert (cfg.loss.beta, cfg.meta.enabled, cfg.train.epochs, cfg.meta.interval) == (0.2, False, 2, 5)
    with pytest.raises(SystemExit):
        config_from_argv(["--help"])
    assert "tracker.alpha" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="meta.interval"):
        config_from_argv(["meta.interval=0"])


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("loss:\n  beta: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(p))
    p.write_text("loss:\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "loss.betta" in str(e.value) and "loss.beta" in str(e.value) and "bad.yaml" in str(e.value)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    p.write_text("meta:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(str(p)).meta.lr == 1e-4


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(path))  # deepspeed paths resolve relative to the YAML too
    cfg = load_config(path)
    cfg.validate(world_size=1)
    assert cfg.tracker.alpha == 0.9 and cfg.meta.lambda_margin == 0.1
    if cfg.model.name_or_path is not None:  # the paper settings
        assert cfg.meta.interval == 100 and cfg.meta.lr == 1e-4 and cfg.meta.val_objective == "log" and cfg.data.val_fraction == 0.03
        assert cfg.model.dtype == "bfloat16" and cfg.train.deepspeed.endswith("zero3.json")
        cfg.validate(world_size=8)
        assert cfg.train.resolved_global_batch(8) == 32
        text = open(path).read()
        assert "0.003" in text and "math.md section 4" in text  # the note about our default meta lr
    elif path.endswith("paper.yaml"):  # the tiny run with the paper's MetaPO settings
        assert cfg.data.path is None and cfg.meta.interval == 100 and cfg.meta.lr == 1e-4 and cfg.meta.optimizer == "adam"
        assert cfg.meta.val_objective == "log" and cfg.data.val_fraction == 0.03 and cfg.data.val_split == "stratified"
    else:
        assert cfg.data.path is None and cfg.meta.lr == 0.003 and cfg.meta.val_objective == "sigmoid"


def test_paper_configs_name_the_paper_models_and_data():
    want = {
        "mistral7b_ultrafeedback.yaml": ("HuggingFaceH4/mistral-7b-sft-beta", "HuggingFaceH4/ultrafeedback_binarized"),
        "llama3_8b_armorm.yaml": ("meta-llama/Meta-Llama-3-8B-Instruct", "princeton-nlp/llama3-ultrafeedback-armorm"),
        "hh_rlhf.yaml": ("meta-llama/Meta-Llama-3-8B-Instruct", "Anthropic/hh-rlhf"),
    }
    for name, (model, data) in want.items():
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert (cfg.model.name_or_path, cfg.data.path) == (model, data)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_deepspeed_json(name, tmp_path):
    path = os.path.join(ROOT, "configs", name)
    raw = json.load(open(path))
    zero = raw["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_param" in zero) == (name == "zero3_offload.json")
    cfg = load_config(None, ["model.name_or_path=org/m", "model.dtype=bfloat16", f"train.deepspeed={path}",
                             "train.per_device_batch_size=2", "train.global_batch_size=32"])
    ds = deepspeed_config(cfg, world_size=8, hidden_size=4096)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 and ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 4096 ** 2
    assert "auto" not in json.dumps(ds)
    # an explicit value that contradicts the run config is a start-up error
    bad = dict(raw, train_micro_batch_size_per_gpu=4)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        load_config(None, ["model.name_or_path=org/m", "model.dtype=bfloat16", f"train.deepspeed={p}"])
    p.write_text(json.dumps(dict(raw, bf16={"enabled": True})))
    with pytest.raises(ConfigError, match="bf16"):
        load_config(None, [f"train.deepspeed={p}"])  # model.dtype float32


def test_resume_fingerprint_ignores_mutable_fields(tmp_path):
    base = load_config(None, [])
    same = load_config(None, ["train.output_dir=elsewhere", "train.max_steps=99", "train.log_every=1",
                              "train.save_every=3", "train.resume=auto", "loss.backend=torch"])
    assert config_fingerprint(base) == config_fingerprint(same)
    check_resume_compatible(base, same)
    changed = load_config(None, ["loss.beta=0.3", "tracker.alpha=0.8"])
    assert config_fingerprint(base) != config_fingerprint(changed)
    assert [k for k, _, _ in config_diff(base, changed)] == ["loss.beta", "tracker.alpha"]
    saved = str(tmp_path / "config.yaml")
    save_yaml(base, saved)
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(saved, changed)
    msg = str(e.value)
    assert "config.yaml" in msg and "loss.beta: saved 0.1, now 0.3" in msg and "tracker.alpha" in msg
    with pytest.raises(ConfigError, match="loss.beta"):
        check_resume_compatible(str(tmp_path), changed)  # a resume directory holding config.yaml
    check_resume_compatible(str(tmp_path), same)
    with pytest.raises(ConfigError, match="no saved config"):
        check_resume_compatible(str(tmp_path / "empty_dir_that_is_missing"), same)
    assert all(k.count(".") == 1 for k in RESUME_MUTABLE_FIELDS)
    keys = {k for k, _ in _leaf_fields(MetaPOConfig)}
    assert RESUME_MUTABLE_FIELDS <= keys


def test_meta_normalize_auto_follows_the_optimizer():
    assert load_config(None, []).meta_normalize == "batch_mean"
    assert load_config(None, ["train.optimizer=sgd"]).meta_normalize == "none"
    assert load_config(None, ["train.optimizer=sgd", "meta.normalize=batch_mean"]).meta_normalize == "batch_mean"
    cfg = load_config(None, ["train.lr=0.01"])
    assert cfg.lookahead_lr == 0.01
    assert load_config(None, ["meta.inner_lr_for_lookahead=0.5"]).lookahead_lr == 0.5


# Each mode-dependent key: a non-default value, overrides that leave its mode, overrides that enter it.
_MODE_CASES = {
    "model.tiny.hidden_size": ("128", ["model.name_or_path=some/model"], []),
    "model.tiny.max_position_embeddings": ("4096", ["model.name_or_path=some/model"], []),
    "data.synthetic.flip_fraction": ("0.4", ["data.path=x.jsonl"], []),
    "data.synthetic.num_pairs": ("300", ["data.path=x.jsonl"], []),
    "loss.focal_gamma": ("2.0", [], ["loss.loss_type=focal"]),
    "loss.simpo_gamma": ("1.0", ["meta.enabled=false"], ["meta.enabled=false", "data.val_split=random", "loss.loss_type=simpo"]),
    "loss.orpo_lambda": ("0.5", ["meta.enabled=false"], ["meta.enabled=false", "data.val_split=random", "loss.loss_type=orpo"]),
    "meta.mlp_hidden": ("16", [], ["meta.arch=mlp"]),
    "meta.kappa": ("3.0", [], ["meta.weighting=ema_margin"]),
    "meta.filter_after_steps": ("50", [], ["meta.weighting=static_filter"]),
    "meta.filter_fraction": ("0.3", ["meta.weighting=static_filter", "meta.filter_by=oracle"], ["meta.weighting=static_filter"]),
    "meta.filter_by": ("prompt_margin", ["meta.weighting=ema_margin"], ["meta.weighting=static_filter"]),
    "meta.filter_weight": ("0.5", ["meta.weighting=ema_margin"], ["meta.weighting=static_filter"]),
    "meta.interval": ("7", ["meta.weighting=ema_margin"], []),
    "meta.start_fraction": ("0.5", ["meta.weighting=ema_margin"], []),
    "meta.lambda_margin": ("0.2", ["meta.weighting=ema_margin"], []),
    "meta.entropy_coef": ("0.01", ["meta.weighting=ema_margin"], []),
    "meta.arch": ("mlp", ["meta.weighting=ema_margin"], []),
    "meta.lr": ("0.01", ["meta.weighting=ema_margin"], []),
    "meta.optimizer": ("sgd", ["meta.weighting=ema_margin"], []),
    "meta.val_objective": ("sigmoid", ["meta.weighting=ema_margin"], []),
    "meta.preconditioner": ("adam", ["meta.weighting=ema_margin"], []),
    "meta.inner_lr_for_lookahead": ("0.001", ["meta.weighting=ema_margin"], []),
    "meta.val_batch_size": ("32", ["meta.weighting=ema_margin"], []),
}


def test_mode_dependent_keys_are_covered():
    """Every key of MODE_DEPENDENT has a case below, and every case names a real key of the table."""
    from metapo_fast.config.schema import MODE_DEPENDENT

    covered = {k if k in MODE_DEPENDENT else k.rsplit(".", 1)[0] + ".*" for k in _MODE_CASES}
    assert covered == set(MODE_DEPENDENT)


@pytest.mark.parametrize("key", sorted(_MODE_CASES))
def test_a_setting_outside_its_mode_is_refused_not_ignored(key):
    value, off, on = _MODE_CASES[key]
    load_config(None, [*on, f"{key}={value}"])  # honoured in its mode
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} is set but has no effect here: it applies only with"):
        load_config(None, [*off, f"{key}={value}"])


def test_switched_off_features_keep_their_settings_and_the_default_file_is_not_the_users(tmp_path):
    # a baseline from the same file: meta.* and the SFT learning rate are kept, not refused
    cfg = load_config(None, ["meta.enabled=false", "meta.lr=0.01", "meta.interval=7", "train.sft_lr=0.01"])
    assert not cfg.meta.enabled
    user = tmp_path / "mine.yaml"
    user.write_text("meta:\n  lr: 0.01\n  interval: 7\nloss:\n  focal_gamma: 2.0\n  loss_type: focal\n")
    load_config(str(user), ["meta.enabled=false"])
    with pytest.raises(ConfigError, match="loss.focal_gamma is set but has no effect"):
        load_config(str(user), ["loss.loss_type=sigmoid"])  # the user's own file set it
    # the embedded default file's keys are not the user's: its synthetic task settings do not block data.path
    from metapo_fast.train.cli import _default_config

    load_config(_default_config(), ["data.path=x.jsonl", "train.sft_warmup_steps=0"], user_yaml=False)


def test_sft_warmup_with_user_data_is_refused_in_one_line(tmp_path, capsys):
    """The SFT warm-up runs on the synthetic task only: with data.path it used to be skipped without a
    word (a random reference with the tiny model); now the run refuses to start."""
    from metapo_fast.train.cli import main as train

    with pytest.raises(ConfigError, match="train.sft_warmup_steps=5 is invalid: the SFT warm-up runs on the embedded synthetic task only"):
        load_config(None, ["data.path=x.jsonl", "train.sft_warmup_steps=5"])
    out = tmp_path / "run"
    assert train([f"data.path={tmp_path / 'x.jsonl'}", f"train.output_dir={out}"]) == 2  # the default sets 30 steps
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.sft_warmup_steps=30" in err[0] and "data.path" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("override,match", [("meta.filter_fraction=1.0", "meta.filter_fraction"),
                                            ("meta.filter_fraction=0", "meta.filter_fraction"),
                                            ("meta.filter_after_steps=0", "meta.filter_after_steps"),
                                            ("meta.filter_weight=1.0", "meta.filter_weight"),
                                            ("meta.filter_weight=-0.1", "meta.filter_weight")])
def test_static_filter_settings_out_of_range_are_refused(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(None, ["meta.weighting=static_filter", override])
