"""Meta-update overhead: (time of one meta-update / K) / (time of one training step), K = 100.

    python -m benchmarks.meta_overhead [--steps 40] [--meta-updates 10]
    python -m benchmarks.meta_overhead --hidden 1536 --layers 16 --heads 12 --kv-heads 4 --batch 8   # ~0.6B

On the embedded tiny model (CPU): median time of a MetaPO training step, of a plain DPO step
(meta off: no weights, single fused pass), and of a meta-update (validation gradient + ghost dot
products + phi step). Writes benchmarks/results/meta_overhead-<UTC time>.{csv,md} (``--record``:
meta_overhead.*, the committed files). GPU: not measured
unless run on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from .common import add_model_args, add_output_args, output_path, ours_overrides, provenance, random_llama_task, write_csv


def _trainer(meta: bool, out: str, device: str, task=None, a=None):
    from metapo_fast.config import load_config
    from metapo_fast.train.cli import _default_config
    from metapo_fast.train.loop import Trainer
    from metapo_fast.train.parallel import DistInfo

    if task is None:  # the embedded tiny model and task
        overrides = [f"train.output_dir={out}", f"meta.enabled={str(meta).lower()}", "train.device=" + device]
    else:
        overrides = ours_overrides(task[0], task[1], a, out, meta=meta, attn="sdpa", device=device)
    cfg = load_config(_default_config(), overrides + ["train.log_every=100000"], user_yaml=False)
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device(device)))


def _median(fn, n: int, device: str) -> float:
    ts = []
    for i in range(n + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--meta-updates", type=int, default=10)
    ap.add_argument("--K", type=int, default=100)
    add_model_args(ap, hidden=None, layers=16, heads=12, kv_heads=4, vocab=32000, batch=8, pairs=200)
    ap.add_argument("--quick", action="store_true", help="3 steps, 2 meta-updates (seconds; a smoke test)")
    add_output_args(ap, "meta_overhead")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.meta_updates = min(args.steps, 3), min(args.meta_updates, 2)
    out = output_path(args, "meta_overhead")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prov = provenance(device, "benchmarks.meta_overhead")
    # our trainer's settings on the random Llama (stepped by hand here, so max_steps only has to be large)
    run_args = argparse.Namespace(**{**vars(args), "steps": 10 ** 6, "lr": 1e-5, "meta_interval": args.K})
    with tempfile.TemporaryDirectory() as d:
        task, model = None, "tiny Llama (2 layers, hidden 64), batch 32 pairs"
        if args.hidden is not None:
            model_dir, data, tokens, n_params = random_llama_task(d, args)
            task = (model_dir, data)
            model = (f"random Llama hidden {args.hidden}, {args.layers} layers ({n_params / 1e6:.0f}M parameters), "
                     f"batch {args.batch} pairs ({tokens:.0f} real tokens)")
        dpo = _trainer(False, os.path.join(d, "dpo"), device, task, run_args)
        t_dpo = _median(dpo._train_step, args.steps, device)
        del dpo
        mp = _trainer(True, os.path.join(d, "metapo"), device, task, run_args)
        t_step = _median(mp._train_step, args.steps, device)
        meta_s = []  # the meta-update runs inside a step (at theta_t); it times itself
        for i in range(args.meta_updates + 3):
            mp._train_step(meta=True)
            if i >= 3:
                meta_s.append(mp.meta_log["metapo/meta_update_s"])
        t_meta = statistics.median(meta_s)
    row = {"device_kind": device, "model": model, "K": args.K,
           "dpo_step_ms": round(t_dpo * 1e3, 3), "metapo_step_ms": round(t_step * 1e3, 3), "meta_update_ms": round(t_meta * 1e3, 3),
           "meta_overhead_pct_at_K": round(100 * t_meta / args.K / t_step, 3),
           "metapo_step_vs_dpo_step": round(t_step / t_dpo, 3), **prov}
    write_csv(out + ".csv", [row])
    lines = ["# Meta-update overhead", "", f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; medians of {args.steps} steps and {args.meta_updates} meta-updates", "",
             "| model | DPO step (ms) | MetaPO step (ms) | meta-update (ms) | overhead at K=%d (%%) | MetaPO step / DPO step |" % args.K,
             "|---|---|---|---|---|---|",
             f"| {row['model']} | {row['dpo_step_ms']} | {row['metapo_step_ms']} | {row['meta_update_ms']} | {row['meta_overhead_pct_at_K']} | {row['metapo_step_vs_dpo_step']} |",
             "", "overhead = (meta-update / K) / MetaPO step. The MetaPO step itself also pays the tracker and the meta-network, per chunk "
             "of the fused loss's single pass on one process (a second policy-logits pass with several ranks); that is the last column.",
             "", "GPU: not measured (no GPU in this session)." if device == "cpu" else ""]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.md and .csv")


if __name__ == "__main__":
    main()
