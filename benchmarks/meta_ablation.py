"""Meta-learner ablation on the default run: which change makes MetaPO's weights separate noisy pairs
and help held-out accuracy? Every variant runs on the same seeds and is compared pairwise with DPO
(and, where given, with the code before a change).

    python -m benchmarks.meta_ablation                         # 5 seeds x DEFAULT_VARIANTS (~15 min on 2 cores)
    python -m benchmarks.meta_ablation --variants dpo cdpo rdpo margin_weights   # the baselines
    python -m benchmarks.meta_ablation --seeds 0 1 --variants dpo metapo_sgd
    python -m benchmarks.meta_ablation --before /path/to/worktree   # adds "before": MetaPO at another checkout
    python -m benchmarks.meta_ablation --quick                 # 1 seed, 40 steps (CI smoke)

Each run is ``python -m metapo_fast.train`` on configs/default.yaml (2000 pairs, 30% flipped,
360 steps, K=5) with ``train.seed = data.synthetic.seed = S`` and the variant's overrides, in a
fresh process. Reported per variant: clean held-out accuracy, the weights' AUROC for clean vs
flipped pairs next to the margin-only detector's AUROC of the same run, the paired difference to
DPO on the same seed and the number of seeds it wins, and the sign pattern of the learned
coefficients across seeds. Results go to ``benchmarks/results/meta_ablation-<UTC time>.md/.csv``,
or to ``meta_ablation.md/.csv`` with ``--record``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .common import add_output_args, mean_std, output_path, provenance, write_csv, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "dpo": ["meta.enabled=false"],
    "metapo": [],
    "metapo_sgd": ["meta.optimizer=sgd"],
    "metapo_std": ["meta.feature_norm=standardize"],
    "metapo_sgd_std": ["meta.optimizer=sgd", "meta.feature_norm=standardize"],
    "metapo_sigval": ["meta.val_objective=sigmoid"],
    "metapo_sgd_sigval": ["meta.optimizer=sgd", "meta.val_objective=sigmoid"],
    # baselines a user would otherwise pick (label noise 30%: eps is the true flip rate)
    "cdpo": ["meta.enabled=false", "loss.label_smoothing=0.3"],
    "rdpo": ["meta.enabled=false", "loss.loss_type=robust", "loss.label_smoothing=0.3"],
    "margin_weights": ["meta.weighting=ema_margin"],
}
DEFAULT_VARIANTS = ["dpo", "metapo", "metapo_sgd", "metapo_std", "metapo_sgd_std"]
FEATURES = ("margin", "ema_margin", "std", "ema_std", "kl", "ema_kl", "bias")


def run_one(variant: str, seed: int, work: str, extra: list[str], cwd: str = ROOT, overrides=None) -> dict:
    out = os.path.join(work, f"{variant}-{seed}")
    args = [*(VARIANTS[variant] if overrides is None else overrides), *extra, f"train.seed={seed}",
            f"data.synthetic.seed={seed}", f"train.output_dir={out}", "train.log_every=1000", "train.eval_every=0"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "metapo_fast.train", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    s = json.load(open(os.path.join(out, "summary.json")))
    row = {"variant": variant, "seed": seed, "eval_accuracy": s.get("eval/accuracy"),
           "weights_auroc": s.get("weights_auroc_clean_vs_flipped"), "margin_auroc": s.get("margin_auroc_clean_vs_flipped"),
           "weight_std": s.get("weight_std"), "meta_overhead_pct": s.get("meta_overhead_pct"),
           "wall_s": round(time.perf_counter() - t0, 1)}
    row.update({f"coef_{k}": v for k, v in (s.get("coefficients") or {}).items()})
    return row


def table(rows: list[dict], variants: list[str], seeds: list[int]) -> list[str]:
    by = {(r["variant"], r["seed"]): r for r in rows}
    lines = ["| variant | clean held-out accuracy | paired diff to DPO (wins / seeds) | weights AUROC | margin AUROC (same runs) "
             "| weights - margin AUROC (wins) | weight std |", "|---|---|---|---|---|---|---|"]
    for v in variants:
        rs = [by[(v, s)] for s in seeds if (v, s) in by]
        acc = mean_std([r["eval_accuracy"] for r in rs])
        if v != "dpo" and all(("dpo", s) in by for s in seeds):
            d = [by[(v, s)]["eval_accuracy"] - by[("dpo", s)]["eval_accuracy"] for s in seeds]
            diff = f"{mean_std(d)} ({sum(x > 0 for x in d)} / {len(d)})"
        else:
            diff = "-"
        if v == "dpo":
            au = gap = "-"
        else:
            g = [r["weights_auroc"] - r["margin_auroc"] for r in rs if r["weights_auroc"] is not None]
            au, gap = mean_std([r["weights_auroc"] for r in rs]), f"{mean_std(g)} ({sum(x > 0 for x in g)} / {len(g)})"
        lines.append(f"| {v} | {acc} | {diff} | {au} | {mean_std([r['margin_auroc'] for r in rs])} | {gap} | "
                     f"{mean_std([r['weight_std'] for r in rs])} |")
    coef = [v for v in variants if any(f"coef_{k}" in by.get((v, s), {}) for s in seeds for k in FEATURES)]
    if coef:
        lines += ["", "Learned coefficients: mean over seeds, and the sign on each seed (+ / - / 0 for |v| < 0.01).", "",
                  "| variant | " + " | ".join(FEATURES) + " |", "|---|" + "---|" * len(FEATURES)]
        for v in coef:
            cells = []
            for k in FEATURES:
                xs = [by[(v, s)].get(f"coef_{k}") for s in seeds if (v, s) in by]
                xs = [x for x in xs if x is not None]
                signs = "".join("0" if abs(x) < 0.01 else ("+" if x > 0 else "-") for x in xs) if k != "bias" else ""
                cells.append(f"{statistics.mean(xs):.3f} {signs}".strip() if xs else "n/a")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--before", default=None, help="a checkout of the code before a change: its MetaPO joins as 'before'")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 400 pairs (a smoke test)")
    add_output_args(ap, "meta_ablation")
    args = ap.parse_args(argv)
    seeds, extra = args.seeds, list(args.extra)
    if args.quick:
        seeds, extra = seeds[:1], [*extra, "train.max_steps=40", "data.synthetic.num_pairs=400", "data.synthetic.num_eval_pairs=100"]
    prov = provenance("cpu", "benchmarks.meta_ablation")
    variants = list(args.variants) + (["before"] if args.before else [])
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for s in seeds:
            for v in variants:
                if v == "before":
                    r = run_one("metapo", s, work + "/before", extra, cwd=os.path.abspath(args.before), overrides=[])
                    r["variant"] = "before"
                else:
                    r = run_one(v, s, work, extra)
                rows.append(r)
                print(f"{v} seed {s}: accuracy {r['eval_accuracy']:.3f}, weights AUROC {r['weights_auroc']}, "
                      f"margin AUROC {r['margin_auroc']}, {r['wall_s']} s", flush=True)
    out = output_path(args, "meta_ablation")
    write_csv(out + ".csv", [{**r, **prov} for r in rows])
    lines = ["# Meta-learner ablation on the default run", "",
             f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; seeds {seeds}; overrides per variant: "
             + "; ".join(f"{v}: {' '.join(VARIANTS[v]) or '(defaults)'}" for v in args.variants)
             + (f"; before: MetaPO defaults at {args.before}" if args.before else ""), "",
             *table(rows, variants, seeds)]
    write_report(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
