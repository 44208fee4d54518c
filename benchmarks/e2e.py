"""End-to-end training throughput: our trainer (DPO, and MetaPO) vs TRL's DPOTrainer, same model,
data, batch and device, in one process.

    python -m benchmarks.e2e [--device cpu|cuda] [--hidden 256 --layers 4 --vocab 32000] [--steps 24]

A Llama-style model with random weights is saved to a temporary directory with the character
tokenizer; the synthetic preference pairs (standard format) go to a JSONL file. Each trainer
runs ``--steps`` optimiser steps of ``--batch`` pairs with AdamW at the same learning rate and
beta 0.1; the first ``--warmup`` steps are not timed. Per-step wall times come from TRL's
``on_step_begin``/``on_step_end`` callbacks and from our trainer's metrics.jsonl; the time per
step is the median step time plus, for MetaPO, its meta-updates amortised over the timed steps.
Throughput is the mean real (unpadded) tokens of a batch of pairs (prompt + chosen and prompt +
rejected) over that time. For GPU runs (bf16) MFU = 6 * parameters * tokens/s / peak bf16 FLOP/s; the reference
forward is not counted. Writes benchmarks/results/e2e_<device>-<UTC time>.{md,csv} (``--record``:
e2e_<device>.*, the committed files; ``--out-dir``, ``--name``), rewritten after every trainer. ``--attn sdpa,varlen`` runs our trainer with each attention.

The 0.5-1B configuration the trainer issue asks for: ``--device cuda --hidden 1536 --layers 16
--heads 12 --kv-heads 4 --vocab 32000 --batch 8 --steps 30`` (about 0.6B parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import add_model_args, add_output_args, ours_overrides, output_path, provenance, random_llama_task, write_csv, write_md


def _median_step(times: list[float], warmup: int) -> float:
    kept = times[warmup:]
    if not kept:
        raise ValueError(f"--steps must exceed --warmup ({warmup}); got {len(times)} steps")
    return statistics.median(kept)


def run_trl(model_dir: str, data: str, a, out: str) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr, beta=0.1,
                     report_to="none", use_cpu=a.device == "cpu", bf16=a.device == "cuda", logging_steps=10 ** 6,
                     save_strategy="no", dataloader_num_workers=0, max_length=512, lr_scheduler_type="constant",
                     weight_decay=0.0, seed=0, gradient_checkpointing=False)  # TRL 1.16 defaults to True; ours runs without
    clock = Clock()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                         processing_class=tok, callbacks=[clock])
    trainer.train()
    return clock.times


def run_ours(model_dir: str, data: str, a, out: str, meta: bool, attn: str) -> tuple[list[float], list[float]]:
    from metapo_fast.train.cli import main

    argv = ours_overrides(model_dir, data, a, out, meta=meta, attn=attn, device=a.device) + ["train.log_every=1"]
    if main(argv) != 0:
        raise RuntimeError(f"metapo_fast.train failed: {' '.join(argv)}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    recs = [r for r in recs if "step_time_s" in r]
    times, meta, prev = [], [], 0.0
    for r in recs:  # step_time_s is the running mean of the step time: recover each step's time
        total = r["step_time_s"] * r["step"]
        times.append(total - prev)
        meta.append(r.get("metapo/meta_update_s", 0.0))  # timed apart from the step: added back below
        prev = total
    return times, meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_model_args(ap, hidden=256, layers=4, heads=4, kv_heads=4, vocab=32000, batch=8)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--meta-interval", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--attn", default="sdpa", help="comma-separated: sdpa, varlen (our trainer runs once per value)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer hidden-64 model, 3 steps (seconds; a smoke test)")
    add_output_args(ap, "e2e_<device>")
    a = ap.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.heads, a.kv_heads, a.vocab, a.batch, a.pairs = 64, 2, 2, 2, 512, 2, 40
        a.steps, a.warmup, a.meta_interval = 3, 1, 2
    attns = a.attn.split(",")
    bad = sorted(set(attns) - {"sdpa", "varlen"})
    if bad:
        ap.error(f"--attn: unknown value(s) {bad}; expected sdpa and/or varlen")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "" if a.device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    from metapo_fast.train.outputs import PEAK_BF16

    out = output_path(a, f"e2e_{a.device}")
    prov = provenance(a.device, "benchmarks.e2e")
    peak = None
    if a.device == "cuda":
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data, tokens_per_step, n_params = random_llama_task(tmp, a)
        setup = (f"Llama hidden {a.hidden}, {a.layers} layers, heads {a.heads}/{a.kv_heads}, vocab {a.vocab} ({n_params / 1e6:.1f}M "
                 f"parameters, random weights), {a.batch} pairs per step ({tokens_per_step:.0f} real tokens), AdamW lr {a.lr}, "
                 f"beta 0.1, {a.steps} steps of which the first {a.warmup} are not timed; medians")
        notes = ("Time per step = median step time + the meta-updates' total time over the timed steps (MetaPO only). "
                 "TRL's step time is measured from on_step_begin to on_step_end; TRL pads (sdpa).")
        if a.device == "cpu":
            notes += " GPU (tokens/s and MFU): not measured here."
        runs = [("TRL DPOTrainer (dpo)", "sdpa", lambda: (run_trl(model_dir, data, a, os.path.join(tmp, "trl")), [0.0] * a.steps))]
        for attn in attns:
            runs.append((f"metapo_fast (dpo, {attn})", attn,
                         lambda attn=attn: run_ours(model_dir, data, a, os.path.join(tmp, f"dpo_{attn}"), meta=False, attn=attn)))
            runs.append((f"metapo_fast (metapo, K={a.meta_interval}, {attn})", attn,
                         lambda attn=attn: run_ours(model_dir, data, a, os.path.join(tmp, f"metapo_{attn}"), meta=True, attn=attn)))
        base = None
        for label, attn, fn in runs:  # the files are rewritten after every trainer: a later failure loses nothing
            times, meta = fn()
            med = _median_step(times, a.warmup)
            meta_per_step = sum(meta[a.warmup:]) / len(meta[a.warmup:])  # the meta-updates, amortised over the timed steps
            per_step = med + meta_per_step
            base = base or per_step
            tps = tokens_per_step / per_step
            rows.append({"trainer": label, "attention": attn, "median_step_s": round(med, 4),
                         "meta_update_s_per_step": round(meta_per_step, 4), "timed_steps": len(times) - a.warmup,
                         "tokens_per_s": round(tps, 1), "time_vs_trl": round(per_step / base, 3),
                         "mfu": round(6 * n_params * tps / peak, 4) if peak else "n/a (CPU)" if a.device == "cpu" else "unknown GPU"})
            write_csv(out + ".csv", rows)
            write_md(out + ".md", "End-to-end training throughput vs TRL DPOTrainer", prov, setup, rows, notes)
            print(f"{label}: median step {med:.4f} s, {tps:.0f} tokens/s", flush=True)
    print(open(out + ".md").read())
    print(f"wrote {out}.md and .csv")


if __name__ == "__main__":
    main()
