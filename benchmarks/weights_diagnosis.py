"""Where is the weights' signal lost? (#13 item 4) Prompt difficulty versus label noise.

    python -m benchmarks.weights_diagnosis --record     # flip20 and flip40, 5 seeds, ~8 min on 2 cores

The quality benchmark's runs (same settings, benchmarks.quality.cell_args) of ``static_filter`` and
``metapo``, kept on disk, then read back with each pair's prompt (the synthetic task has 100 prompts
"a+b=", ~20 pairs each). For every run:

* the pairs the weighting suppresses (static filter: the dropped set; MetaPO: the same number of
  lowest final weights): how many are really flipped (precision; chance = the flip rate), and how
  concentrated they are by prompt (the share of them in the 10 prompts that lose the most pairs;
  10% if spread evenly);
* how much of the variance of the clean pairs' final weights is between prompts (eta^2 of the
  weight by prompt: 1 = a clean pair's weight is set by its prompt, 0 = prompt plays no part);
* the same for the policy's final margin (``margin`` column).

A weighting that keys on prompt difficulty rather than on the label suppresses whole prompts: their
clean pairs go with their flipped ones, and held-out accuracy on those prompts falls.

Second part, ``--trajectory``: plain DPO runs of the same setting, stopped every ``--every`` steps
to compute the margin of every training pair (the pass the static filter makes once): the margin's
AUROC clean vs flipped, eta^2 of the clean pairs' margin by prompt, and the prompt concentration of
the eps lowest margins, over training. This is when a margin-based weight could tell a flipped pair
from a hard clean one. Beside the margin, two other detectors of the same pass: the margin centred on
its prompt's mean margin (``centred_auroc``: what is left once prompt difficulty is removed; it needs
prompt groups, which real preference data mostly lacks) and the margin's change since the previous
pass (``trend_auroc``: a flipped pair's margin falls while the prompt's other pairs teach the opposite).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from .common import add_output_args, mean_std, output_path, provenance, write_csv, write_report
from .quality import CONDITIONS, _worker_init, run_one


def eta_squared(values: np.ndarray, groups: np.ndarray) -> float:
    """Between-group share of the variance of ``values`` (one-way ANOVA's eta^2)."""
    values = np.asarray(values, float)
    total = ((values - values.mean()) ** 2).sum()
    if total <= 0:
        return float("nan")
    between = sum(((values[groups == g].mean() - values.mean()) ** 2) * (groups == g).sum() for g in np.unique(groups))
    return float(between / total)


def _task(condition: str, seed: int):
    """The synthetic task of a benchmarks.quality cell, from the same overrides as its runs."""
    from metapo_fast.config import load_config
    from metapo_fast.data.synthetic import task_from_config
    from metapo_fast.train.cli import _default_config

    from .quality import cell_args

    return task_from_config(load_config(_default_config(), cell_args(condition, "dpo", seed, "unused", False)).data.synthetic)


def analyse(run_dir: str, condition: str, seed: int) -> dict:
    eps = CONDITIONS[condition][1]
    task = _task(condition, seed)
    with open(os.path.join(run_dir, "pair_weights.csv")) as f:
        rows = list(csv.DictReader(f))
    prompt = np.array([task.train_rows[int(r["source_row"])]["prompt"] for r in rows])
    w = np.array([float(r["weight"]) for r in rows])
    z = np.array([float(r["margin"]) for r in rows])
    flipped = np.array([int(r["is_flipped"]) == 1 for r in rows])
    k = int(round(eps * len(w)))
    low = np.zeros(len(w), bool)
    low[np.argsort(w, kind="stable")[:k]] = True  # static filter: exactly its dropped set (weights 0)
    per_prompt = {p: int(low[prompt == p].sum()) for p in np.unique(prompt)}
    top10 = sum(sorted(per_prompt.values(), reverse=True)[:10])
    clean = ~flipped
    return {"precision": float(flipped[low].mean()), "chance": float(flipped.mean()),
            "top10_prompt_share": top10 / max(k, 1),
            "prompts_half_suppressed": sum(low[prompt == p].mean() >= 0.5 for p in np.unique(prompt)),
            "eta2_weight_clean": eta_squared(w[clean], prompt[clean]),
            "eta2_margin_clean": eta_squared(z[clean], prompt[clean])}


def gradient_shares(z: np.ndarray, flipped: np.ndarray, dropped: dict) -> dict:
    """Where DPO's gradient comes from at this pass: a pair's loss gradient in its margin z is
    sigma(-z), so ``flipped_grad_share`` = sum over flipped pairs of sigma(-z) / sum over all pairs
    (what fraction of the step's push is the wrong way). For each filter in ``dropped`` (name -> boolean
    mask of the pairs it drops): the flipped share of what is left, and ``clean_grad_lost``, the
    share of the clean pairs' sigma(-z) it removes."""
    g = 1.0 / (1.0 + np.exp(z))  # sigma(-z)
    out = {"flipped_grad_share": float(g[flipped].sum() / g.sum())}
    for name, d in dropped.items():
        kept = ~d
        out[f"flipped_grad_share_after_{name}"] = float(g[kept & flipped].sum() / g[kept].sum())
        out[f"clean_grad_lost_by_{name}"] = float(g[d & ~flipped].sum() / g[~flipped].sum())
    return out


def trajectory(condition: str, seed: int, every: int, workdir: str) -> list[dict]:
    """Plain DPO under benchmarks.quality's settings, measuring every training pair's margin each
    ``every`` steps (see the module docstring)."""
    import torch

    from metapo_fast.config import load_config
    from metapo_fast.data.synthetic import task_from_config
    from metapo_fast.metapo.weight_net import prompt_centred
    from metapo_fast.train.cli import _default_config
    from metapo_fast.train.loop import Trainer
    from metapo_fast.train.outputs import auroc
    from metapo_fast.train.parallel import DistInfo

    from .quality import cell_args

    eps = CONDITIONS[condition][1]
    out = os.path.join(workdir, f"traj-{condition}-{seed}")
    cfg = load_config(_default_config(), cell_args(condition, "dpo", seed, out, False))
    tr = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    task = task_from_config(cfg.data.synthetic)
    ds = tr.data.train
    prompt = np.array([task.train_rows[int(r)]["prompt"] for r in ds.source_rows])
    flipped = ds.column("is_flipped") == 1
    k = int(round(eps * len(ds)))
    rows, z_prev, lp_prev = [], None, None
    groups = np.unique(prompt, return_inverse=True)[1]
    while True:
        if tr.step % every == 0 or tr.step == tr.total_steps:
            st = tr.fwd.pair_stats(ds, tr.data.collator, ("margins", "chosen_logps", "rejected_logps"))
            z, lp = st["margins"], np.stack([st["chosen_logps"], st["rejected_logps"]], 1)
            low = np.zeros(len(z), bool)
            low[np.argsort(z, kind="stable")[:k]] = True
            counts = sorted((int(low[prompt == p].sum()) for p in np.unique(prompt)), reverse=True)
            centred = prompt_centred(z, groups)
            trend = z - z_prev if z_prev is not None else np.zeros_like(z)
            z_prev = z
            low_c = np.zeros(len(z), bool)
            low_c[np.argsort(centred, kind="stable")[:k]] = True
            # among the eps lowest margins (the pairs a margin rule would suppress, and most of DPO's gradient):
            # does the margin, its trend, or the trend of either response's log-prob tell the flipped from the
            # hard clean? (a flipped pair's "chosen" is the wrong answer: learning the rule lowers it)
            d_lp = lp - lp_prev if lp_prev is not None else np.zeros_like(lp)
            lp_prev = lp
            within = {f"low_{name}_auroc": auroc(x[low], ~flipped[low]) if 0 < flipped[low].sum() < low.sum() else None
                      for name, x in (("margin", z), ("trend", trend), ("chosen_logp_trend", d_lp[:, 0]),
                                      ("rejected_logp_fall", -d_lp[:, 1]))}
            rows.append({"condition": condition, "seed": seed, "step": tr.step, "margin_auroc": auroc(z, ~flipped),
                         "centred_auroc": auroc(centred, ~flipped), "trend_auroc": auroc(trend, ~flipped),
                         "precision_lowest": float(flipped[low].mean()), "top10_prompt_share": sum(counts[:10]) / max(k, 1),
                         "eta2_margin_clean": eta_squared(z[~flipped], prompt[~flipped]),
                         **gradient_shares(z, flipped, {"margin_filter": low, "centred_filter": low_c}), **within})
        if tr.step >= tr.total_steps:
            break
        tr._train_step(meta=False)
        tr.step += 1
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--conditions", default="flip20,flip40")
    ap.add_argument("--methods", default="static_filter,metapo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trajectory", action="store_true", help="also the DPO margin trajectory (second table)")
    ap.add_argument("--every", type=int, default=120, help="steps between two margin passes of --trajectory")
    add_output_args(ap, "weights_diagnosis")
    args = ap.parse_args(argv)
    out = output_path(args, "weights_diagnosis")
    prov = provenance("cpu", "benchmarks.weights_diagnosis")
    methods = [m for m in args.methods.split(",") if m]
    todo = [(c, m, s) for s in range(args.seeds) for c in args.conditions.split(",") for m in methods]
    rows, t0 = [], time.perf_counter()
    import multiprocessing as mp

    with tempfile.TemporaryDirectory() as work, ProcessPoolExecutor(
            args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        jobs = {pool.submit(run_one, c, m, s, work, False): ("run", c, m, s) for c, m, s in todo}
        if args.trajectory:  # in the same queue, so both workers stay busy
            jobs.update({pool.submit(trajectory, c, s, args.every, work): ("trajectory", c, "dpo", s)
                         for s in range(args.seeds) for c in args.conditions.split(",")})
        traj = []
        for k, f in enumerate(as_completed(jobs), 1):
            kind, c, m, s = jobs[f]
            if kind == "trajectory":
                traj += [{**r, **prov} for r in f.result()]
                print(f"[{k}/{len(jobs)}, {(time.perf_counter() - t0) / 60:.1f} min] trajectory {c} seed {s}", flush=True)
                continue
            r = f.result()
            a = analyse(os.path.join(work, f"{c}-{m}-{s}"), c, s)
            rows.append({"condition": c, "method": m, "seed": s, "eval_accuracy": r["eval_accuracy"],
                         "weights_auroc": r["weights_auroc"], **a, **prov})
            print(f"[{k}/{len(jobs)}, {(time.perf_counter() - t0) / 60:.1f} min] {c} {m} seed {s}: " +
                  ", ".join(f"{key} {val:.3f}" for key, val in a.items()), flush=True)
    if rows:
        write_csv(out + ".csv", rows)
    if traj:
        write_csv(out + "_trajectory.csv", traj)
    keys = ["eval_accuracy", "weights_auroc", "precision", "chance", "top10_prompt_share", "prompts_half_suppressed",
            "eta2_weight_clean", "eta2_margin_clean"]
    lines = ["# Where the weights' signal is lost: prompt difficulty versus label noise", "",
             f"device: {prov['device']}; torch {prov['torch']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; seeds 0-{args.seeds - 1}; {(time.perf_counter() - t0) / 60:.1f} min", ""]
    if rows:
        lines += ["Runs as in benchmarks.quality (12 epochs of 2000 pairs). Suppressed = the static filter's dropped set, or "
                  "MetaPO's same number of lowest final weights (eps of the pairs). precision = flipped share of them "
                  "(chance = the flip rate); top10_prompt_share = share of them in the 10 prompts (of 100) that lose the most "
                  "(0.10 if even); prompts_half_suppressed = prompts losing at least half their pairs; eta2 = between-prompt "
                  "share of the variance of the clean pairs' final weight / final margin.", "",
                  "| condition | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for c in args.conditions.split(",") if rows else []:
        for m in methods:
            rs = [r for r in rows if r["condition"] == c and r["method"] == m]
            lines.append(f"| {c} | {m} | " + " | ".join(mean_std([r[k] for r in rs]) for k in keys) + " |")
    if traj:
        tkeys = [k for k in ("margin_auroc", "centred_auroc", "trend_auroc", "precision_lowest", "top10_prompt_share",
                             "eta2_margin_clean", "flipped_grad_share", "flipped_grad_share_after_margin_filter",
                             "clean_grad_lost_by_margin_filter", "flipped_grad_share_after_centred_filter",
                             "clean_grad_lost_by_centred_filter", "low_margin_auroc", "low_trend_auroc",
                             "low_chosen_logp_trend_auroc", "low_rejected_logp_fall_auroc") if k in traj[0]]
        lines += ["", "## DPO's margin over training (every training pair, the pass a static filter makes)", "",
                  "precision_lowest = flipped share of the eps lowest margins (chance = the flip rate); centred_auroc: "
                  "the margin minus its prompt's mean margin; trend_auroc: the margin's change since the previous "
                  "pass (0.5 at the first). flipped_grad_share: the flipped pairs' share of sum sigma(-z), DPO's "
                  "per-pair gradient scale; _after_margin_filter / _after_centred_filter: the same once the eps lowest "
                  "margins (centred margins) are dropped; clean_grad_lost_by_*: the share of the clean pairs' sigma(-z) "
                  "that filter drops. low_*_auroc: clean vs flipped among the eps lowest margins only, by the margin, its change "
                  "since the previous pass, the chosen response's log-prob change, and the rejected one's fall.", "",
                  "| condition | step | " + " | ".join(tkeys) + " |", "|---|---|" + "---|" * len(tkeys)]
        for c in args.conditions.split(","):
            for step in sorted({r["step"] for r in traj if r["condition"] == c}):
                rs = [r for r in traj if r["condition"] == c and r["step"] == step]
                lines.append(f"| {c} | {step} | " + " | ".join(mean_std([r[k] for r in rs]) for k in tkeys) + " |")
    write_report(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
