"""End-to-end runs of `python -m metapo_fast.train` on the embedded tiny task (1 process, CPU)."""
import csv
import json
import os

import pytest
import torch

from metapo_fast.train.state import CheckpointManager
from metapo_fast.config import load_config
from metapo_fast.train.parallel import DistInfo
from metapo_fast.train.cli import _default_config, main

SMALL = ["data.synthetic.num_pairs=160", "data.synthetic.num_eval_pairs=40", "data.val_fraction=0.1",
         "train.per_device_batch_size=8", "train.sft_warmup_steps=5", "train.log_every=1", "train.eval_every=0",
         "meta.interval=3", "meta.val_batch_size=8", "meta.start_fraction=0"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def _train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in _metrics(run_dir) if "loss" in r and "rewards/margins" in r]


def _run(tmp_path, name, extra, base=SMALL):
    out = str(tmp_path / name)
    assert main([*base, f"train.output_dir={out}", *extra]) == 0
    return out


# the learned meta-network's settings are refused with meta.weighting=ema_margin (config.schema.MODE_DEPENDENT)
SMALL_NO_LEARNING = [a for a in SMALL if not a.startswith(("meta.interval=", "meta.val_batch_size=", "meta.start_fraction="))]


def _crash_before_the_end_and_resume(tmp_path, full, args, base=SMALL_NO_LEARNING):
    """A copy of the 6-step run ``full`` without its final checkpoint, resumed from its last earlier
    one: the losses must equal the uninterrupted run's (1e-6). Returns the resumed run's directory."""
    import shutil

    crashed = str(tmp_path / "crashed")
    shutil.copytree(full, crashed)
    shutil.rmtree(os.path.join(crashed, "checkpoints", "step_00000006"))
    assert main([*base, f"train.output_dir={crashed}", *args, "train.resume=auto"]) == 0
    for (_, la), (_, lb) in zip(_train_losses(full), _train_losses(crashed)):
        assert la == pytest.approx(lb, abs=1e-6)
    return crashed


def test_default_config_is_the_embedded_tiny_run():
    cfg = load_config(_default_config())
    assert cfg.model.name_or_path is None and cfg.data.path is None and cfg.meta.enabled
    assert cfg.data.synthetic.flip_fraction == pytest.approx(0.3)


def test_metapo_run_outputs_and_exact_resume(tmp_path):
    """A MetaPO run writes everything a user needs, and resuming from its step-6 checkpoint
    reproduces the uninterrupted run's loss curve (fp32 CPU: equal within 1e-6)."""
    full = _run(tmp_path, "full", ["train.max_steps=12", "train.save_every=6"])
    # outputs: config, metrics with TRL's names, summary, pair table, final HF model, checkpoints
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "pair_weights.csv", "final_model/config.json"):
        assert os.path.exists(os.path.join(full, f)), f
    recs = _metrics(full)
    keys = set().union(*recs)
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "metapo/weight_mean", "metapo/weight_std", "metapo/coef/ema_std", "tokens_per_s"):
        assert k in keys, k
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["steps"] == 12 and summary["meta_updates"] == 4
    # phi moved (v starts at 0) and the weights spread away from 1
    assert max(abs(v) for k, v in summary["coefficients"].items() if k != "bias") > 1e-3
    assert summary["weight_std"] > 0.01
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and summary["meta_overhead_pct"] > 0
    assert 0.0 <= summary["margin_auroc_clean_vs_flipped"] <= 1.0
    with open(os.path.join(full, "pair_weights.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 144 and {"source_row", "pair_id", "weight", "p", "ema_std", "is_flipped"} <= set(rows[0])
    weights = [float(r["weight"]) for r in rows]
    assert weights == sorted(weights)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(full, "final_model"))
    assert sum(p.numel() for p in model.parameters()) > 0
    cm = CheckpointManager(full)
    assert cm.steps() == [6, 12] and cm.latest_valid()[0] == 12
    # resume: a run directory holding only the step-6 checkpoint (as after a crash at step 9)
    import shutil

    crashed = str(tmp_path / "crashed")
    shutil.copytree(full, crashed)
    shutil.rmtree(os.path.join(crashed, "checkpoints", "step_00000012"))
    assert main([*SMALL, f"train.output_dir={crashed}", "train.max_steps=12", "train.save_every=6", "train.resume=auto"]) == 0
    a, b = _train_losses(full), _train_losses(crashed)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6)
    sa = json.load(open(os.path.join(crashed, "summary.json")))
    assert sa["eval/accuracy"] == summary["eval/accuracy"]
    assert sa["coefficients"] == pytest.approx(summary["coefficients"], abs=1e-6)


def test_ema_margin_baseline_weights_and_exact_resume(tmp_path):
    """meta.weighting=ema_margin: weights spread from 1 with no meta-update, and a resume from the
    step-3 checkpoint (its feature statistics restored) reproduces the run."""
    args = ["meta.weighting=ema_margin", "meta.kappa=3.0", "train.max_steps=6", "train.save_every=3"]
    full = _run(tmp_path, "full", args, base=SMALL_NO_LEARNING)
    s = json.load(open(os.path.join(full, "summary.json")))
    assert s["meta_updates"] == 0 and s["weight_std"] > 0.01 and "coefficients" not in s
    crashed = _crash_before_the_end_and_resume(tmp_path, full, args)
    assert json.load(open(os.path.join(crashed, "summary.json")))["weight_std"] == pytest.approx(s["weight_std"], abs=1e-6)


def test_meta_start_fraction_holds_every_weight_at_one_until_the_first_due_step(tmp_path):
    """meta.start_fraction=0.58 of 12 steps (step 7) with K=3: meta-updates at steps 9 and 12 only
    (not 3 and 6), every pair weighs exactly 1 until the first one has moved phi; resumes from step 6
    (before the start) and step 9 (after the first update) reproduce the run, and a resume that
    lengthens the run keeps the start it was saved with."""
    import shutil

    args = ["meta.start_fraction=0.58", "train.max_steps=12", "train.save_every=3", "train.keep_checkpoints=4"]
    full = _run(tmp_path, "full", args)
    s = json.load(open(os.path.join(full, "summary.json")))
    assert s["meta_updates"] == 2 and s["meta_start_step"] == 7
    assert max(abs(v) for k, v in s["coefficients"].items() if k != "bias") > 1e-3
    recs = _metrics(full)
    assert sorted(r["step"] for r in recs if "metapo/L_val" in r) == [9, 12]
    logged = {r["step"]: r for r in recs if "metapo/weight_std" in r}
    assert all(logged[k]["metapo/weight_std"] == 0.0 for k in range(1, 10))  # step 9's weights precede its update
    assert max(logged[k]["metapo/weight_std"] for k in (10, 11, 12)) > 1e-4
    for keep in (6, 9):  # a crash after step `keep`: the later checkpoints are gone
        crashed = str(tmp_path / f"crashed{keep}")
        shutil.copytree(full, crashed)
        for later in range(keep + 3, 13, 3):
            shutil.rmtree(os.path.join(crashed, "checkpoints", f"step_{later:08d}"))
        assert main([*SMALL, f"train.output_dir={crashed}", *args, "train.resume=auto"]) == 0
        a, b = _train_losses(full), _train_losses(crashed)
        assert [t for t, _ in a] == [t for t, _ in b] == list(range(1, 13))
        for (_, la), (_, lb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-6)
        assert json.load(open(os.path.join(crashed, "summary.json")))["coefficients"] == pytest.approx(s["coefficients"], abs=1e-6)
    # twice the length from step 9's checkpoint: the start stays step 7 (not round(0.58 * 24) = 14)
    longer = str(tmp_path / "longer")
    shutil.copytree(full, longer)
    shutil.rmtree(os.path.join(longer, "checkpoints", "step_00000012"))
    assert main([*SMALL, f"train.output_dir={longer}", *args, "train.max_steps=18", "train.resume=auto"]) == 0
    s18 = json.load(open(os.path.join(longer, "summary.json")))
    assert s18["meta_start_step"] == 7 and s18["meta_updates"] == 4  # steps 9, 12, 15, 18


@pytest.mark.parametrize("by", ["margin", "prompt_margin"])
def test_static_filter_drops_the_lowest_margins_after_warmup_and_resumes(tmp_path, by, capsys):
    """meta.weighting=static_filter: all weights 1 until meta.filter_after_steps, then the
    filter_fraction of training pairs with the lowest margin (or margin minus its prompt's mean)
    weigh 0 for good; a resume after the fit restores the kept set exactly (same losses)."""
    import numpy as np

    args = ["meta.weighting=static_filter", "meta.filter_after_steps=2", "meta.filter_fraction=0.25",
            "train.max_steps=6", "train.save_every=4", f"meta.filter_by={by}"]
    full = _run(tmp_path, "full", args, base=SMALL_NO_LEARNING)
    ranked = {"margin": "(margin <= ", "prompt_margin": "(margin minus its prompt's mean <= "}[by]
    assert f"step 2: static filter dropped {round(0.25 * 144)} of 144 training pairs {ranked}" in capsys.readouterr().out
    s = json.load(open(os.path.join(full, "summary.json")))
    assert s["meta_updates"] == 0 and "coefficients" not in s
    rows = list(csv.DictReader(open(os.path.join(full, "pair_weights.csv"))))
    w = np.array([float(r["weight"]) for r in rows])
    n = len(rows)
    assert (w == 0).sum() == round(0.25 * n) and np.allclose(w[w > 0], n / (n - round(0.25 * n)))
    recs = _metrics(full)
    assert all(r["metapo/weight_std"] == 0 for r in recs if "metapo/weight_std" in r and r["step"] <= 2)
    assert any(r["metapo/weight_std"] > 0 for r in recs if "metapo/weight_std" in r and r["step"] > 2)
    crashed = _crash_before_the_end_and_resume(tmp_path, full, args)
    again = [float(r["weight"]) for r in csv.DictReader(open(os.path.join(crashed, "pair_weights.csv")))]
    assert again == w.tolist()


def test_oracle_filter_drops_exactly_the_flipped_pairs(tmp_path):
    """meta.filter_by=oracle (a diagnostic): at meta.filter_after_steps the pairs the data marks
    is_flipped weigh 0, every other pair the same; no forward pass, nothing learned."""
    import numpy as np

    args = ["meta.weighting=static_filter", "meta.filter_by=oracle", "meta.filter_after_steps=2", "train.max_steps=4",
            "data.synthetic.flip_fraction=0.3"]
    out = _run(tmp_path, "oracle", args, base=SMALL_NO_LEARNING)
    rows = list(csv.DictReader(open(os.path.join(out, "pair_weights.csv"))))
    w = np.array([float(r["weight"]) for r in rows])
    flipped = np.array([int(r["is_flipped"]) == 1 for r in rows])
    assert 0 < flipped.sum() < len(rows)
    assert (w[flipped] == 0).all() and (w[~flipped] > 0).all() and np.allclose(w[~flipped], w[~flipped][0])
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["weights_auroc_clean_vs_flipped"] == 1.0
    soft = _run(tmp_path, "soft", args + ["meta.filter_weight=0.25"], base=SMALL_NO_LEARNING)
    ws = np.array([float(r["weight"]) for r in csv.DictReader(open(os.path.join(soft, "pair_weights.csv")))])
    assert np.allclose(ws[flipped] / ws[~flipped][0], 0.25) and np.allclose(ws[~flipped], ws[~flipped][0])


def test_oracle_filter_needs_the_is_flipped_column(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)}) + "\n"
                            for i in range(40)))
    with pytest.raises(ValueError, match=r"filter_by=oracle .*pairs\.jsonl has no is_flipped column"):
        main([f"data.path={path}", "data.val_fraction=0.1", "train.per_device_batch_size=8", "train.sft_warmup_steps=0",
              "meta.weighting=static_filter", "meta.filter_by=oracle", "meta.filter_after_steps=2", "train.max_steps=4",
              f"train.output_dir={tmp_path / 'out'}"])


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "focal", "simpo", "orpo", "robust"])
def test_every_loss_runs_with_the_meta_learner(tmp_path, loss):
    extra = [f"loss.loss_type={loss}", "train.max_steps=4"]
    if loss in ("simpo", "orpo"):  # reference-free: no KL features, no reference margin to stratify by
        extra += ["meta.features=no_reference", "data.val_split=random"]
    out = _run(tmp_path, loss, extra)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["steps"] == 4 and s["meta_updates"] == 1


def test_resume_with_a_different_config_is_refused(tmp_path):
    out = _run(tmp_path, "a", ["train.max_steps=3", "meta.enabled=false"])
    with pytest.raises(ValueError, match="loss.beta: saved 0.1, now 0.3"):
        main([*SMALL, f"train.output_dir={out}", "train.max_steps=6", "meta.enabled=false", "loss.beta=0.3", "train.resume=auto"])


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch, capsys):
    """NaN (then inf) injected into the loss of steps 3-5: each step is skipped (no optimiser or
    tracker update), counted, logged with its pair ids; the third consecutive one stops the run."""
    import metapo_fast.train.forward as F
    import metapo_fast.train.loop as T

    real = F.fused_linear_preference_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        if torch.is_grad_enabled() and out.loss.requires_grad:
            calls["n"] += 1
            if calls["n"] >= 3:
                out.loss = out.loss * (float("nan") if calls["n"] % 2 else float("inf"))
        return out

    monkeypatch.setattr(F, "fused_linear_preference_loss", poisoned)
    cfg = load_config(_default_config(), [*SMALL, f"train.output_dir={tmp_path / 'nan'}", "train.max_steps=8",
                                          "meta.enabled=false", "train.max_consecutive_nonfinite=3"])
    trainer = T.Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer._train_step(); trainer.step += 1
    trainer._train_step(); trainer.step += 1
    state_before = trainer.tracker.state.clone()
    params_before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer._train_step(); trainer.step += 1  # NaN: skipped
    assert torch.equal(trainer.tracker.state, state_before)
    assert all(torch.equal(a, b) for a, b in zip(params_before, trainer.model.parameters()))
    assert trainer.counters["nonfinite_skips"] == 1
    trainer._train_step(); trainer.step += 1  # inf: skipped
    with pytest.raises(T.NonFiniteError, match="3 consecutive non-finite steps"):
        trainer._train_step()
    assert "non-finite loss or gradient, step skipped on every rank (pairs [" in capsys.readouterr().out


@pytest.mark.parametrize("override,match", [
    ("meta.interval=0", "meta.interval"), ("tracker.alpha=1.5", "tracker.alpha"),
    ("loss.loss_type=kto", "loss.loss_type"), ("train.lr=-1", "train.lr"), ("no.such.key=1", "no.such.key"),
])
def test_bad_config_fails_at_startup_with_a_clear_message(tmp_path, override, match, capsys):
    assert main([f"train.output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and match in err


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    """SIGKILL the training process at random moments (twice), resume each time with
    train.resume=auto: the final loss curve and summary equal those of an uninterrupted run."""
    import random
    import signal
    import subprocess
    import sys
    import time

    args = [*SMALL, "train.max_steps=16", "train.save_every=2", "meta.interval=4"]
    full = _run(tmp_path, "full", args, base=SMALL_NO_LEARNING)
    crashed = str(tmp_path / "crashed")
    cmd = [sys.executable, "-m", "metapo_fast.train", *args, f"train.output_dir={crashed}", "train.resume=auto"]
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # wait until training has started
            if os.path.exists(os.path.join(crashed, "metrics.jsonl")) and os.path.getsize(os.path.join(crashed, "metrics.jsonl")):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    a, b = _train_losses(full), _train_losses(crashed)
    assert [s for s, _ in b] == list(range(1, 17))
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6)
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (full, crashed))
    assert sa["eval/accuracy"] == sb["eval/accuracy"] and sa["coefficients"] == pytest.approx(sb["coefficients"], abs=1e-6)
    assert CheckpointManager(crashed).latest_valid()[0] == 16


def test_local_hf_model_and_local_jsonl(tmp_path):
    """A model saved with save_pretrained and a local JSONL in TRL's conversational format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from metapo_fast.data.synthetic import build_char_tokenizer, make_synthetic_task

    tok = build_char_tokenizer()
    model_dir, data = tmp_path / "model", tmp_path / "pairs.jsonl"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = make_synthetic_task(96, 0.3, 0.0, 0, 0).train_rows
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
    out = str(tmp_path / "run")
    assert main([f"model.name_or_path={model_dir}", f"data.path={data}", "train.sft_warmup_steps=0", "data.max_length=32", "data.max_prompt_length=24",
                 "data.val_fraction=0.1", "train.per_device_batch_size=8", "train.max_steps=3", "meta.interval=3",
                 "meta.val_batch_size=8", "train.eval_every=0", f"train.output_dir={out}"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["steps"] == 3 and s["meta_updates"] == 1
    with open(os.path.join(out, "pair_weights.csv")) as f:
        rows_out = list(csv.DictReader(f))
    src = [int(r["source_row"]) for r in rows_out]
    assert 84 <= len(src) <= 87 and len(set(src)) == len(src) and set(src) <= set(range(96))  # ~10% went to validation


@pytest.mark.gpu
def test_gpu_run_with_streamed_reference_and_varlen_matches_resident_padded(tmp_path):
    """On a GPU: the reference streamed from host memory and packed varlen attention (bf16)
    give the loss curve of the resident reference with padded SDPA (bf16 tolerance)."""
    extra = ["train.max_steps=6", "model.dtype=bfloat16"]
    a = _run(tmp_path, "resident", extra)
    b = _run(tmp_path, "streamed", [*extra, "model.ref_offload_cpu=true", "model.attn_implementation=varlen"])
    la, lb = ([l for _, l in _train_losses(d)] for d in (a, b))
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=3e-2, atol=3e-2)
    summary = json.load(open(os.path.join(b, "summary.json")))
    assert summary["reference"] == "cpu, streamed per block"


def test_mfu_is_six_n_tokens_over_the_gpu_peak(monkeypatch):
    """MFU = 6 * parameters * tokens/s / (peak bf16 FLOP/s * GPUs); None on GPUs without a known peak."""
    from metapo_fast.train import outputs as T

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3, bias=False))  # 220 + 60 parameters
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert T.mfu(model, 1e9) == pytest.approx(6 * 280 * 1e9 / 989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-40GB")
    assert T.mfu(model, 2e9) == pytest.approx(6 * 280 * 2e9 / 312e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert T.mfu(model, 1e9) is None


@pytest.mark.gpu
def test_gpu_training_step_syncs_with_the_host_once(tmp_path):
    """The design claim of README (Host syncs): one host read per optimiser step (the finite check)."""
    import warnings

    from metapo_fast.train.parallel import init_distributed
    from metapo_fast.train.loop import Trainer

    cfg = load_config(_default_config(), [*SMALL, f"train.output_dir={tmp_path}", "meta.interval=1000"])
    tr = Trainer(cfg, init_distributed(cfg.train.dist_timeout_s, cfg.train.device))
    for _ in range(2):  # warm-up: kernel compilation and caches
        tr._train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr._train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


def _trainer(tmp_path, name, extra):
    from metapo_fast.train.loop import Trainer

    cfg = load_config(_default_config(), [*SMALL, f"train.output_dir={tmp_path / name}", *extra])
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def test_weights_are_normalised_over_the_whole_optimiser_step(tmp_path):
    """batch_mean normalises over every micro-batch of a step: 2 micro-batches of 8 pairs take the
    same step as 1 micro-batch of the same 16 pairs (per-micro-batch means would differ)."""
    runs = []
    for name, extra in (("accum", ["train.per_device_batch_size=8", "train.global_batch_size=16"]),
                        ("whole", ["train.per_device_batch_size=16"])):
        tr = _trainer(tmp_path, name, [*extra, "meta.interval=1000"])
        assert tr.grad_accum == (2 if name == "accum" else 1)
        tr._train_step()  # all weights 1 (v = 0); moves the policy so that margins are non-zero next
        with torch.no_grad():
            tr.meta_net.v.copy_(torch.tensor([1.5, -0.7, 0.3, 0.2, -0.4, 0.1]))  # weights far from 1
            tr.meta_net.mean_ema.zero_(), tr.meta_net.sq_ema.fill_(1e-6), tr.meta_net.stats_steps.fill_(1)  # scale 0.01
        m = tr._train_step()
        runs.append((tr, m))
    (a, ma), (b, mb) = runs
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6)
    assert float(mb["metapo/weight_std"]) > 0.1  # the weights really differ from 1
    torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-5, atol=1e-6)


def test_meta_update_runs_at_theta_t_on_every_micro_batch(tmp_path, monkeypatch):
    """The meta-update of a step sees the parameters before that step's optimiser step and the
    features of all its micro-batches; the step's own gradient is untouched by it."""
    tr = _trainer(tmp_path, "theta", ["train.per_device_batch_size=4", "train.global_batch_size=8", "meta.interval=1"])
    before = [p.detach().clone() for p in tr.model.parameters()]
    seen = {}
    real = tr.meta.step

    def spy(model, batches, val, feats, ref_model=None):
        seen["same_params"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        seen["pairs"], seen["rows"] = sum(b["input_ids"].shape[0] // 2 for b in batches), feats.shape[0]
        return real(model, batches, val, feats, ref_model=ref_model)

    monkeypatch.setattr(tr.meta, "step", spy)
    tr._train_step(meta=True)
    assert seen == {"same_params": True, "pairs": 8, "rows": 8}
    assert tr.counters["meta_updates"] == 1 and "metapo/L_val" in tr.meta_log
    # the same step without the meta-update moves the policy identically (its gradients were set aside)
    twin = _trainer(tmp_path, "twin", ["train.per_device_batch_size=4", "train.global_batch_size=8", "meta.interval=1"])
    twin._train_step(meta=False)
    for pa, pb in zip(tr.model.parameters(), twin.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_a_planted_pickle_in_a_run_directory_is_refused_and_runs_nothing(tmp_path):
    """trainer_state.pt is loaded with weights_only=True: a checkpoint whose state file holds a pickle
    with code (its manifest made to match) makes resume and the report refuse it, naming the file,
    and the code never runs."""
    import hashlib

    from metapo_fast.report import load_meta_net
    from metapo_fast.train.state import CheckpointError

    out = _run(tmp_path, "run", ["train.max_steps=2", "train.save_every=1"])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = CheckpointManager(out).latest_valid()[1]
    state = os.path.join(ckpt, "trainer_state.pt")
    torch.save({"step": 2, "meta": Evil()}, state)
    manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
    manifest["files"]["trainer_state.pt"] = {"sha256": hashlib.sha256(open(state, "rb").read()).hexdigest(),
                                             "bytes": os.path.getsize(state)}
    json.dump(manifest, open(os.path.join(ckpt, "manifest.json"), "w"))
    assert CheckpointManager.verify(ckpt)[0]
    with pytest.raises(CheckpointError, match="trainer_state.pt is not a metapo_fast trainer state that loads safely"):
        main([*SMALL, f"train.output_dir={out}", "train.max_steps=3", "train.save_every=1", "train.resume=auto"])
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_meta_net(out)
    assert not marker.exists()


def test_summary_table_says_how_the_weights_compare_with_the_margin():
    from metapo_fast.config import load_config
    from metapo_fast.train.outputs import summary_lines

    cfg = load_config(None, ["meta.interval=5"])
    base = {"steps": 12, "eval/accuracy": 0.6, "weight_mean": 1.0, "weight_std": 0.2, "meta_updates": 2, "meta_overhead_pct": 31.74,
            "tokens_per_s": 1234.5, "nonfinite_skips": 0, "run_dir": "/runs/x"}
    text = "\n".join(summary_lines({**base, "weights_auroc_clean_vs_flipped": 0.70, "margin_auroc_clean_vs_flipped": 0.60}, cfg))
    assert "held-out accuracy (eval/accuracy)  0.600" in text
    assert "0.700: they separate flipped pairs better than the margin alone does (margin AUROC 0.600)" in text
    assert "2 at K=5, 31.7% of the training time at this K" in text and "python -m metapo_fast.report /runs/x" in text
    worse = "\n".join(summary_lines({**base, "weights_auroc_clean_vs_flipped": 0.40, "margin_auroc_clean_vs_flipped": 0.63}, cfg))
    assert "worse than the margin alone" in worse
    unknown = "\n".join(summary_lines(base, cfg))  # user data: nothing known to be flipped
    assert "no pairs known to be flipped" in unknown and "AUROC" not in unknown
    off = "\n".join(summary_lines(base, load_config(None, ["meta.enabled=false"])))
    assert "meta.enabled=false" in off and "meta-updates" not in off


def test_phase_lines_and_resume_line(tmp_path, caplog):
    """Rank 0 says what it is doing and for how long, and a resumed run says where it resumed."""
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="metapo_fast.train")
    args = ["train.max_steps=4", "train.save_every=2"]
    full = _run(tmp_path, "full", args)
    said = [r.getMessage() for r in caplog.records if r.name == "metapo_fast.train"]
    for phase in ("loading the model and tokenizer, then the SFT warm-up of the reference (5 steps)", "loading and tokenising the data",
                  "setting up the optimiser", "final evaluation"):
        assert f"{phase} ..." in said and any(m.startswith(f"{phase}: done in ") for m in said), (phase, said)
    caplog.clear()
    shutil.rmtree(os.path.join(full, "checkpoints", "step_00000004"))
    assert main([*SMALL, f"train.output_dir={full}", *args, "train.resume=auto"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "metapo_fast.train"]
    assert any(m.startswith("resuming from ") and "step_00000002" in m for m in said), said
    assert "resumed at step 2 of 4" in said
    assert not any("SFT warm-up" in m for m in said)  # the resumed run loads the saved reference


def test_a_run_without_any_meta_update_says_so(tmp_path, caplog):
    """K=4 from step round(0.9 * 6) = 5 leaves no meta-update in 6 steps: the run warns once, names the
    settings, and still finishes (every weight 1); a run with meta-updates does not warn."""
    import logging

    caplog.set_level(logging.INFO, logger="metapo_fast.train")
    s = json.load(open(os.path.join(_run(tmp_path, "none", ["meta.interval=4", "meta.start_fraction=0.9",
                                                                 "train.max_steps=6"]), "summary.json")))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no meta-update" in r.getMessage()]
    assert len(warned) == 1 and "meta.interval=4 from step 5" in warned[0], warned
    assert s["meta_updates"] == 0 and s["weight_std"] == 0.0
    caplog.clear()
    _run(tmp_path, "some", ["train.max_steps=6"])
    assert not any("no meta-update" in r.getMessage() for r in caplog.records)


def test_a_training_step_reads_the_host_once(tmp_path):
    """One host read per optimiser step from the trainer's code (the finite flag of the whole step),
    counted on CPU over every .item/.tolist/bool/float/int of a tensor made from metapo_fast: MetaPO
    weights, 2 micro-batches. (Logging and meta-update steps read more; the GPU test checks syncs.)"""
    from tests.test_distributed import _HostReads

    tr = _trainer(tmp_path, "reads", ["train.per_device_batch_size=4", "train.global_batch_size=8", "meta.interval=1000"])
    assert tr.grad_accum == 2
    tr._train_step()  # warm-up
    reads = _HostReads()
    try:
        reads.on = True
        tr._train_step()
        tr._train_step()
        reads.on = False
    finally:
        reads.close()
    assert len(reads.ours) == 2 and all("parallel.py" in r for r in reads.ours), reads.ours


def test_metapo_weights_per_chunk_take_the_two_pass_step_at_8nhv(tmp_path):
    """#14 item 5 in the trainer (one process): MetaPO's weights come from the fused loss's per-chunk
    callback, so the LM head's policy logits are computed once per step (8 N_loss*H*V instead of the
    margins pass + gradient pass's 10), and the step equals the two-pass one: policy, tracker, loss,
    with weights far from 1, 2 micro-batches of several chunks each."""
    from benchmarks.counters import Counters

    runs = []
    for per_chunk in (True, False):
        tr = _trainer(tmp_path, f"chunks{per_chunk}", ["train.per_device_batch_size=8", "train.global_batch_size=16",
                                                        "meta.interval=1000", "loss.chunk_bytes=60000"])
        tr.weights_per_chunk = per_chunk
        tr._train_step()
        with torch.no_grad():
            tr.meta_net.v.copy_(torch.tensor([1.5, -0.7, 0.3, 0.2, -0.4, 0.1]))  # weights far from 1
            tr.meta_net.mean_ema.zero_(), tr.meta_net.sq_ema.fill_(1e-6), tr.meta_net.stats_steps.fill_(1)
        vocab = tr.model.config.vocab_size
        with Counters(vocab=vocab) as c:
            m = tr._train_step()
        runs.append((tr, m, c.head_flops))
    (a, ma, fa), (b, mb, fb) = runs
    assert fa / fb == pytest.approx(0.8, rel=0.01), (fa, fb)  # 8 / 10 N_loss*H*V: the head's forward once
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(a.tracker.state, b.tracker.state, rtol=1e-5, atol=1e-6)
    assert float(ma["metapo/weight_std"]) > 0.1
    torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-5, atol=1e-6)


def test_pair_stats_reads_every_pair_in_pair_id_order(tmp_path):
    """PairForward.pair_stats (the static filter's and the diagnostics' pass): the margins it reads
    are beta times the policy's log-ratio difference over the reference's, pair by pair, and
    margins() is its (margins, kl) pair."""
    import numpy as np

    tr = _trainer(tmp_path, "stats", [])
    tr._train_step()  # margins away from 0
    ds = tr.data.train
    fields = ("margins", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "kl")
    s = tr.fwd.pair_stats(ds, tr.data.collator, fields, batch_size=7)  # batches that do not divide N
    assert all(s[f].shape == (len(ds),) and s[f].dtype == np.float64 for f in fields)
    want = tr.cfg.loss.beta * ((s["chosen_logps"] - s["ref_chosen_logps"]) - (s["rejected_logps"] - s["ref_rejected_logps"]))
    np.testing.assert_allclose(s["margins"], want, rtol=1e-5, atol=1e-6)
    assert np.abs(s["margins"]).max() > 0 and (s["kl"] >= -1e-6).all()
    z, kl = tr.fwd.margins(ds, tr.data.collator)
    np.testing.assert_allclose(z, s["margins"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kl, s["kl"], rtol=1e-6, atol=1e-7)
    one = tr.fwd.pair_stats(torch.utils.data.Subset(ds, [5]), tr.data.collator, ("margins",))
    np.testing.assert_allclose(one["margins"], s["margins"][5:6], rtol=1e-5, atol=1e-6)
