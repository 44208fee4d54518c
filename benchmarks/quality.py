"""Noisy-label quality benchmark (issue #13's protocol): do MetaPO's weights find the bad pairs, and
does that beat DPO and the robust-DPO baselines a user would otherwise pick?

    python -m benchmarks.quality --record          # full: 5 conditions x 8 methods x 5 seeds, 2 workers
    python -m benchmarks.quality --quick           # CI: 1 seed, 2 conditions, 4 methods, 60 steps
    python -m benchmarks.quality --record --epochs 48 --seeds 3 --conditions flip20,flip40 --methods dpo
                                                   # the convergence check: twice as long (quality_e48.md)

Task: the embedded synthetic addition task (100 prompts "a+b=", known ground truth), tiny Llama
(2 layers, hidden 64), 30 SFT steps of reference warm-up, AdamW lr 3e-4, 32 pairs per step.
Conditions (training pairs; the held-out evaluation set is always 500 clean pairs):

* ``flip0`` / ``flip20`` / ``flip40``: 2000 pairs (20 per prompt), 0 / 20 / 40% flipped labels;
* ``mixed``: 2000 pairs, 20% flipped and 20% ambiguous (both answers wrong, random label);
* ``robust``: 6000 pairs (60 per prompt), 20% flipped: the noise averages out over many pairs per
  prompt, so DPO is (nearly) robust there; do-no-harm is measured on it.

All conditions train the same number of steps: 24 epochs of 2000 pairs, 8 of 6000 (~1450 steps,
four times the default run). The length is where DPO converges at 20% flips: 3 seeds of DPO gave
0.857 / 0.927 / 0.931 at 12 / 24 / 48 epochs (seeds 0-2; a higher lr, 1e-3, is worse at both
lengths: 0.752 / 0.833). At 40% flips DPO is still learning slowly (0.597 / 0.646 / 0.684), which
the results say (quality_e48.md). The earlier 12-epoch protocol's rows are in quality_e12.md.

Methods (each one ``python -m metapo_fast.train`` with overrides, run in a worker process):
``dpo``; ``dpo_oracle`` (same pairs, true labels, ambiguous pairs removed: the upper bound,
noisy conditions only); ``cdpo`` (label smoothing eps); ``rdpo`` (Chowdhury et al. 2024's unbiased
loss, TRL's "robust", flip rate eps); ``focalpo`` (gamma 0.05); ``static_filter`` (paper App. A.8:
after two epochs of DPO, drop the eps fraction of pairs with the lowest margin); ``margin_weights``
(w = normalised sigmoid(kappa * normalised EMA margin), nothing learned); ``metapo`` (the shipped
defaults). eps is the condition's known noise rate (flipped + half the ambiguous; 0.1 at 0%), the
best case for the baselines that need it.

Reported per condition and method: clean held-out accuracy (mean +- std over seeds), the paired
per-seed difference to DPO (same data, same seed) with the number of seeds it wins, the share of
the DPO -> oracle gap closed, the weights' AUROC clean vs flipped beside the margin-only
detector's (the policy's own last margin, same run), mean weights of clean / ambiguous / flipped
pairs, MetaPO's learned coefficients and their sign pattern over seeds, and a check of each
criterion of #13 item 3. Rows are written after every run, and ``--resume`` skips the runs a
previous (interrupted) invocation already wrote.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from .common import add_output_args, mean_std, output_path, provenance, write_csv

STEPS_EPOCHS = 24  # epochs of 2000 pairs; conditions with more pairs train the same number of steps
CONDITIONS = {  # name: (overrides, noise rate eps given to the baselines that need one, training pairs)
    "flip0": (["data.synthetic.flip_fraction=0.0"], 0.1, 2000),
    "flip20": (["data.synthetic.flip_fraction=0.2"], 0.2, 2000),
    "flip40": (["data.synthetic.flip_fraction=0.4"], 0.4, 2000),
    "mixed": (["data.synthetic.flip_fraction=0.2", "data.synthetic.ambiguous_fraction=0.2"], 0.3, 2000),
    "robust": (["data.synthetic.flip_fraction=0.2"], 0.2, 6000),
}
NOISY = ("flip20", "flip40", "mixed", "robust")
FOCAL_GAMMA = 0.05
METHODS = {  # name: function of (eps, warm-up steps, total steps) -> overrides
    "dpo": lambda eps, warm, total: ["meta.enabled=false"],
    "dpo_oracle": lambda eps, warm, total: ["meta.enabled=false", "data.synthetic.oracle_labels=true"],
    "cdpo": lambda eps, warm, total: ["meta.enabled=false", f"loss.label_smoothing={eps}"],
    "rdpo": lambda eps, warm, total: ["meta.enabled=false", "loss.loss_type=robust", f"loss.label_smoothing={eps}"],
    "focalpo": lambda eps, warm, total: ["meta.enabled=false", "loss.loss_type=focal", f"loss.focal_gamma={FOCAL_GAMMA}"],
    "static_filter": lambda eps, warm, total: ["meta.weighting=static_filter", f"meta.filter_after_steps={warm}",
                                        f"meta.filter_fraction={eps}"],
    "margin_weights": lambda eps, warm, total: ["meta.weighting=ema_margin"],
    "metapo": lambda eps, warm, total: [],
}
# candidates measured beside the shipped defaults (not in the default method list; --methods names them)
CANDIDATES = {
    # Each candidate names every setting it was recorded with that differs from today's defaults, so
    # its rows stay what they say when a default changes (the "metapo" rows are always the defaults).
    # Every candidate recorded before meta.start_fraction's default became 1/3 ran with meta-updates from step K.
    # the default until then (rows recorded as "metapo" at d419ddf; the rows recorded as "metapo_late" at 658200f,
    # start at a third of the run, are the "metapo" rows since)
    "metapo_start0": lambda eps, warm, total: ["meta.start_fraction=0"],
    # the default before 20a219f: meta lr 0.03, log L_val (rows recorded as "metapo" before it)
    "metapo_lr3e-2": lambda eps, warm, total: ["meta.lr=0.03", "meta.val_objective=log", "meta.start_fraction=0"],
    # the default from 20a219f to the switch to the bounded L_val: meta lr 0.003, log L_val
    "metapo_lr3e-3": lambda eps, warm, total: ["meta.lr=0.003", "meta.val_objective=log", "meta.start_fraction=0"],
    "metapo_cdpo": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.lr=0.03",  # MetaPO's weights on cDPO's loss
                                             "meta.val_objective=log", "meta.start_fraction=0"],
    "metapo_mlp": lambda eps, warm, total: ["meta.arch=mlp", "meta.lr=0.03",  # a non-monotone weight function (6-32-1)
                                            "meta.val_objective=log", "meta.start_fraction=0"],
    # the bounded L_val sigma(-z) (now the default): late in training the validation set's own flipped pairs
    # are the only unsaturated terms of -log sigma(z), so g_meta follows them and the weights can invert
    "metapo_sigval": lambda eps, warm, total: ["meta.val_objective=sigmoid", "meta.lr=0.003", "meta.start_fraction=0"],
    # c_i = <g_meta, P g_i> with the policy AdamW's diagonal P: the lookahead of the step Adam takes
    "metapo_adamP": lambda eps, warm, total: ["meta.preconditioner=adam", "meta.val_objective=sigmoid", "meta.lr=0.003",
                                              "meta.start_fraction=0"],
    # MetaPO's weights on cDPO's loss with the bounded L_val and meta lr 0.003 (cDPO is the best baseline
    # at 24 epochs in four of five conditions; metapo_cdpo above is the old settings at 12 epochs)
    "metapo_on_cdpo": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.val_objective=sigmoid", "meta.lr=0.003",
                                                "meta.start_fraction=0"],
    # the same with a third of the meta lr: the weights stay nearer 1, trading metapo_on_cdpo's gain at 20% flips
    # (+0.022 over cDPO) for its losses to cDPO alone at 40% / mixed / 60 per prompt
    "metapo_on_cdpo_lr1e-3": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.val_objective=sigmoid",
                                                       "meta.lr=0.001", "meta.start_fraction=0"],
    # metapo_on_cdpo with meta-updates only from a third of the run on (recorded with meta.start_step = round(total / 3),
    # the same step as today's default start_fraction 1/3): every weight 1 until the margins carry the signal
    # (weights_diagnosis_detectors: AUROC 0.68 / 0.54 at step 120 vs 0.92 / 0.64 at step 480, 20% / 40% flips)
    "metapo_on_cdpo_late": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.val_objective=sigmoid",
                                                     "meta.lr=0.003"],
    # the same with a larger meta lr (sharper weights once they start): metapo_on_cdpo_late closed 37% of the gap at
    # 20% flips with flipped pairs weighted 0.78 against 1.06 for clean ones
    "metapo_on_cdpo_late_lr1e-2": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.val_objective=sigmoid",
                                                            "meta.lr=0.01"],
    "metapo_on_cdpo_late_lr3e-2": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.val_objective=sigmoid",
                                                            "meta.lr=0.03"],
    # the default's start (a third of the run) against half as late and half again as late
    "metapo_start1of6": lambda eps, warm, total: [f"meta.start_fraction={1 / 6}"],
    "metapo_start1of2": lambda eps, warm, total: ["meta.start_fraction=0.5"],
    # without the volatility features (std, ema_std: the coefficients whose sign is not stable over seeds, quality.md),
    # so the weights are a function of the margins and the KLs only
    "metapo_novol": lambda eps, warm, total: ["meta.features=no_volatility"],
    "metapo_on_cdpo_late_novol": lambda eps, warm, total: [f"loss.label_smoothing={eps}", "meta.val_objective=sigmoid",
                                                           "meta.lr=0.003", "meta.features=no_volatility"],
    # the static filter after two thirds of the run instead of two epochs (weights_diagnosis: the margin
    # flags flipped pairs at AUROC 0.66 at step 120, 0.92 at step 480 at 20% flips)
    "static_filter_late": lambda eps, warm, total: ["meta.weighting=static_filter",
                                                    f"meta.filter_after_steps={round(2 * total / 3)}",
                                             f"meta.filter_fraction={eps}"],
    # diagnostics, not methods: the ceiling of any detector. The static filter fed the true flip flags (exactly the
    # flipped pairs dropped, from step 1, from a sixth of the run, and from a third: where MetaPO's weights start)
    **{f"oracle_filter_from_{name}": (lambda eps, warm, total, f=f: ["meta.weighting=static_filter", "meta.filter_by=oracle",
                                                                    f"meta.filter_after_steps={max(1, round(f * total))}"])
       for name, f in (("start", 0.0), ("1of6", 1 / 6), ("1of3", 1 / 3), ("2of3", 2 / 3))},
    # the oracle from a third of the run, down-weighting the flipped pairs instead of dropping them: how sharp must a
    # perfect detector's weights be? (MetaPO's final flipped / clean weight ratio is about 0.8 at 20% flips)
    **{f"oracle_soft{w}_from_1of3": (lambda eps, warm, total, w=w: ["meta.weighting=static_filter", "meta.filter_by=oracle",
                                                                   f"meta.filter_after_steps={round(total / 3)}",
                                                                   f"meta.filter_weight={w}"])
       for w in ("0.25", "0.75")},
    # the static filter on the policy's margin at the same steps (the oracle filter from a third of the run closes
    # 99% / 86% of the 20% / 40% gaps: how much of that does the margin's detection at that step keep?)
    **{f"static_filter_from_{name}": (lambda eps, warm, total, f=f: ["meta.weighting=static_filter",
                                                                     f"meta.filter_after_steps={max(1, round(f * total))}",
                                                                     f"meta.filter_fraction={eps}"])
       for name, f in (("1of6", 1 / 6), ("1of3", 1 / 3))},
    # the same filter ranking each pair's margin minus its prompt's mean margin (the margin filter's wrong drops are
    # the clean pairs of hard prompts: weights_diagnosis.md), after the warm-up of static_filter and at the same steps
    "static_filter_prompt": lambda eps, warm, total: ["meta.weighting=static_filter", "meta.filter_by=prompt_margin",
                                                      f"meta.filter_after_steps={warm}", f"meta.filter_fraction={eps}"],
    **{f"static_filter_prompt_from_{name}": (lambda eps, warm, total, f=f: ["meta.weighting=static_filter",
                                                                            "meta.filter_by=prompt_margin",
                                                                            f"meta.filter_after_steps={max(1, round(f * total))}",
                                                                            f"meta.filter_fraction={eps}"])
       for name, f in (("1of6", 1 / 6), ("1of3", 1 / 3))},
}
ALL_METHODS = {**METHODS, **CANDIDATES}
# rows keep the name of the settings they ran with: when a default changes, the rows recorded as "metapo" take the
# candidate name of the old default and the candidate recorded with the new default becomes "metapo"
RENAMED = ("Method names are today's (`CANDIDATES` in benchmarks/quality.py): the rows recorded as `metapo` at d419ddf "
           "(meta-updates from step K) are `metapo_start0`, and those recorded as `metapo_late` at 658200f (from a third "
           "of the run, today's default `meta.start_fraction`) are `metapo`.")
BASE = ["data.synthetic.num_eval_pairs=500", "train.log_every=100000", "train.eval_every=0", "train.save_every=0"]
QUICK = ["train.max_steps=60", "data.synthetic.num_eval_pairs=100"]


def cell_args(condition: str, method: str, seed: int, out: str, quick: bool, epochs_of_2000: int = STEPS_EPOCHS,
              extra: tuple = ()) -> list[str]:
    over, eps, n = CONDITIONS[condition]
    if quick:
        n = 400
    epochs = max(1, round(epochs_of_2000 * 2000 / n))
    per_epoch = max(1, int(n * 0.97) // 32)  # optimiser steps per epoch (3% validation split, 32 pairs per step)
    warm = 2 * per_epoch  # two epochs of DPO before the static filter
    return [*BASE, *over, f"data.synthetic.num_pairs={n}", f"train.epochs={epochs}", *ALL_METHODS[method](eps, warm, epochs * per_epoch),
            *(QUICK if quick else []), *extra,
            f"data.synthetic.seed={seed}", f"train.seed={seed}", f"train.output_dir={out}"]


def _auroc(scores, positive):
    from metapo_fast.train.outputs import auroc

    return auroc(np.asarray(scores, float), np.asarray(positive, bool)) if 0 < np.sum(positive) < len(positive) else None


def read_run(out: str, method: str) -> dict:
    """The numbers of one finished run from its summary.json and pair_weights.csv."""
    s = json.load(open(os.path.join(out, "summary.json")))
    with open(os.path.join(out, "pair_weights.csv")) as f:
        rows = list(csv.DictReader(f))
    w = np.array([float(r["weight"]) for r in rows])
    if method == "focalpo":  # FocalPO's implicit weight p^gamma
        w = np.array([float(r["p"]) for r in rows]) ** FOCAL_GAMMA
    z = np.array([float(r["margin"]) for r in rows])
    flipped = np.array([int(r.get("is_flipped", 0)) == 1 for r in rows])
    ambiguous = np.array([int(r.get("is_ambiguous", 0)) == 1 for r in rows])
    clean = ~flipped & ~ambiguous
    sel = ~ambiguous  # clean vs flipped: ambiguous pairs have no true label
    rec = {"eval_accuracy": s.get("eval/accuracy"),
           "weights_auroc": _auroc(w[sel], clean[sel]), "margin_auroc": _auroc(z[sel], clean[sel]),
           "weights_auroc_clean_vs_noisy": _auroc(w, clean),
           "w_clean": float(w[clean].mean()) if clean.any() else None,
           "w_ambiguous": float(w[ambiguous].mean()) if ambiguous.any() else None,
           "w_flipped": float(w[flipped].mean()) if flipped.any() else None,
           "meta_overhead_pct": s.get("meta_overhead_pct"), "steps": s.get("steps")}
    rec.update({f"coef_{k}": v for k, v in (s.get("coefficients") or {}).items()})
    return rec


def _worker_init():
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as metapo_fast.train does on CPU (a Trainer built here too)
    torch.set_num_threads(1)  # two workers on two cores


def run_one(condition: str, method: str, seed: int, workdir: str, quick: bool, epochs_of_2000: int = STEPS_EPOCHS,
            extra: tuple = ()) -> dict:
    from metapo_fast.train.cli import main

    out = os.path.join(workdir, f"{condition}-{method}-{seed}")
    args = cell_args(condition, method, seed, out, quick, epochs_of_2000, extra)
    t0 = time.perf_counter()
    import contextlib
    import io

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = main(args)
    if rc != 0:
        raise RuntimeError(f"{condition}/{method}/seed {seed}: python -m metapo_fast.train {' '.join(args)} exited {rc}:\n"
                           + log.getvalue()[-3000:])
    return {"condition": condition, "method": method, "seed": seed, **read_run(out, method),
            "wall_s": round(time.perf_counter() - t0, 1)}


def plan(conditions, methods, seeds) -> list[tuple]:
    return [(c, m, s) for s in seeds for c in conditions for m in methods if not (m == "dpo_oracle" and c not in NOISY)]


# ---------------------------------------------------------------------------------------- report
def _vals(rows, c, m, key):
    return {r["seed"]: float(r[key]) for r in rows if r["condition"] == c and r["method"] == m
            and r.get(key) not in (None, "") and math.isfinite(float(r[key]))}


def uses_true_labels(method: str) -> bool:
    """The yardsticks that read the true labels (clean-label DPO, the oracle filters): never a
    baseline a user could pick."""
    return method == "dpo_oracle" or method.startswith("oracle_")


def paired(rows, c, m, base="dpo", key="eval_accuracy"):
    """Per-seed differences m - base on the seeds both have."""
    a, b = _vals(rows, c, m, key), _vals(rows, c, base, key)
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def gap_closed(rows, c, m):
    """Share of the DPO -> clean-label DPO gap that m closes: mean(m - dpo) / mean(oracle - dpo)."""
    d, g = paired(rows, c, m), paired(rows, c, "dpo_oracle")
    if not d or not g or statistics.mean(g) <= 0:
        return None
    return statistics.mean(d) / statistics.mean(g)


def _fmt(x, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def criteria(rows, conditions, methods, who: str = "metapo") -> list[str]:
    """#13 item 3, each criterion checked on these rows for ``who`` (PASS / FAIL / not measured)."""
    out = []

    def line(ok, text):
        out.append(f"- {'not measured' if ok is None else 'PASS' if ok else 'FAIL'}: {text}")

    if who not in methods:
        return [f"- not measured: no {who} rows"]
    for c in ("flip20", "flip40"):
        if c in conditions:
            w, z = _vals(rows, c, who, "weights_auroc"), _vals(rows, c, who, "margin_auroc")
            ok = None if not w else statistics.mean(w.values()) >= statistics.mean(z.values())
            line(ok, f"{c}: weights AUROC {mean_std(w.values())} >= margin-only AUROC {mean_std(z.values())}")
    if "mixed" in conditions:
        wc, wa, wf = (_vals(rows, "mixed", who, k) for k in ("w_clean", "w_ambiguous", "w_flipped"))
        means = [statistics.mean(v.values()) if v else None for v in (wc, wa, wf)]
        ok = None if None in means else means[0] > means[1] > means[2]
        line(ok, "mixed: mean weight clean > ambiguous > flipped (" + " / ".join(_fmt(x) for x in means) + ")")
    for c in NOISY:
        if c not in conditions or "dpo_oracle" not in methods:
            continue
        gap = statistics.mean(paired(rows, c, "dpo_oracle")) if paired(rows, c, "dpo_oracle") else None
        if gap is None:
            line(None, f"{c}: no dpo / dpo_oracle rows")
            continue
        if gap < 0.01:
            line(None, f"{c}: noise costs DPO {_fmt(gap)} (< 1 point): not a 'noise hurts' cell")
            continue
        d = paired(rows, c, who)
        if not d:
            line(None, f"{c}: no {who} rows")
            continue
        gc = gap_closed(rows, c, who)
        wins = sum(x > 0 for x in d)
        line(None if gc is None else gc >= 0.5 and wins >= min(4, len(d)),
             f"{c}: closes {_fmt(gc, True)} of the DPO -> oracle gap ({_fmt(gap)}), >= 50% and winning >= 4 of 5 seeds "
             f"(wins {wins}/{len(d)})")
        base = [m for m in methods if m != "dpo" and not m.startswith("metapo") and not uses_true_labels(m)]
        base = [m for m in base if _vals(rows, c, m, "eval_accuracy")]
        best = max(base, key=lambda m: statistics.mean(_vals(rows, c, m, "eval_accuracy").values()), default=None)
        if best:
            a = statistics.mean(_vals(rows, c, who, "eval_accuracy").values())
            b = statistics.mean(_vals(rows, c, best, "eval_accuracy").values())
            line(a >= b, f"{c}: not below the best baseline ({best} {_fmt(b)}; {who} {_fmt(a)})")
    for c in ("flip0", "robust"):
        if c in conditions:
            d = paired(rows, c, who)
            ok = None if not d else statistics.mean(d) >= -0.01
            line(ok, f"{c}: do no harm, within 1 point of DPO ({who} - dpo {mean_std(d)})")
    return out


def sign_pattern(rows, c) -> dict:
    keys = sorted({k for r in rows for k in r if k.startswith("coef_") and r.get(k) not in (None, "")})
    pat = {}
    for k in keys:
        v = list(_vals(rows, c, "metapo", k).values())
        if v:
            pos = sum(x > 0 for x in v)
            pat[k[5:]] = f"{'+' if pos * 2 > len(v) else '-'} {max(pos, len(v) - pos)}/{len(v)}"
    return pat


def _invocations(rows) -> list[tuple[tuple[str, str], int]]:
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r.get("command", "?"), r.get("commit", "?"))
        counts[key] = counts.get(key, 0) + 1
    return list(counts.items())


def render(rows, conditions, methods, seeds, prov, quick, wall_min, epochs: int = STEPS_EPOCHS) -> str:
    length = "" if epochs == STEPS_EPOCHS else f", {epochs} epochs of 2000 pairs (the protocol's {STEPS_EPOCHS} x {epochs / STEPS_EPOCHS:g})"
    lines = [f"# Quality benchmark: noisy-label synthetic task ({'quick' if quick else 'full'}{length})", "",
             f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; seeds: {seeds}; wall time {wall_min:.1f} min", "",
             "Rows by invocation (a --resume run adds rows to the file):", "",
             *[f"- {n} rows: `{cmd}` at {commit}" for (cmd, commit), n in _invocations(rows)], "",
             *([RENAMED, ""] if not quick else []),
             "Protocol: issue #13 (benchmarks/quality.py docstring). Accuracy = clean held-out preference accuracy "
             "(500 clean pairs). Delta = paired per-seed difference to DPO (same data and seed), wins = seeds "
             "where the method is above DPO. Gap closed = mean(method - DPO) / mean(oracle - DPO). AUROC: "
             "clean vs flipped training pairs, by the final weight (FocalPO: p^gamma; DPO/cDPO/rDPO: all weights 1, "
             "0.500) and by the policy's own last margin in the same run (the margin-only detector).", ""]
    for c in conditions:
        over, eps, n = CONDITIONS[c]
        lines += [f"## {c}: {' '.join(o.split('.', 2)[-1] for o in over)}, {n if not quick else 400} pairs, eps {eps}", "",
                  "| method | accuracy | delta vs DPO | wins | gap closed | weights AUROC | margin AUROC | "
                  "w clean / ambiguous / flipped | meta overhead % |", "|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            acc = _vals(rows, c, m, "eval_accuracy")
            if not acc:
                continue
            d = paired(rows, c, m) if m != "dpo" else []
            wins = f"{sum(x > 0 for x in d)}/{len(d)}" if d else ""
            gc = _fmt(gap_closed(rows, c, m), True) if c in NOISY and m not in ("dpo", "dpo_oracle") else ""
            wts = " / ".join(mean_std(_vals(rows, c, m, k).values()) if _vals(rows, c, m, k) else "-"
                             for k in ("w_clean", "w_ambiguous", "w_flipped"))
            lines.append(f"| {m} | {mean_std(acc.values())} | {mean_std(d) if d else ''} | {wins} | {gc} | "
                         f"{mean_std(_vals(rows, c, m, 'weights_auroc').values())} | "
                         f"{mean_std(_vals(rows, c, m, 'margin_auroc').values())} | {wts} | "
                         f"{mean_std(_vals(rows, c, m, 'meta_overhead_pct').values())} |")
        lines.append("")
    pats = {c: sign_pattern(rows, c) for c in conditions}
    keys = sorted({k for p in pats.values() for k in p})
    if keys:
        lines += ["## MetaPO's learned coefficients", "",
                  "Mean +- std over seeds of the linear meta-network's coefficients (on normalised features), then the "
                  "majority sign and in how many seeds it holds.", "",
                  "| condition | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for c in conditions:
            lines.append(f"| {c} | " + " | ".join(mean_std(_vals(rows, c, "metapo", "coef_" + k).values()) for k in keys) + " |")
            lines.append(f"| {c} sign | " + " | ".join(pats[c].get(k, "") for k in keys) + " |")
        lines.append("")
    for who in [m for m in methods if m.startswith("metapo")] or ["metapo"]:
        lines += [f"## Issue #13 item 3, checked on these rows ({who})", "", *criteria(rows, conditions, methods, who), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, flip0 and flip40, 4 methods, 60 steps of 400 pairs (CI)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset of " + ",".join(CONDITIONS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS))
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    ap.add_argument("--epochs", type=int, default=STEPS_EPOCHS,
                    help="training length in epochs of 2000 pairs (conditions with more pairs train as many steps); "
                         f"other than {STEPS_EPOCHS}, the results go to quality_e<epochs>.md/.csv")
    ap.add_argument("--resume", action="store_true", help="keep the rows of <out>.csv and run only the missing ones")
    ap.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides added to every run (e.g. train.lr=1e-3), after the method's own; "
                         "use with --name, so that the protocol's own files are not mixed with other settings")
    add_output_args(ap, "quality (quality_quick with --quick)")
    args = ap.parse_args(argv)
    conditions, methods = args.conditions.split(","), args.methods.split(",")
    for name, given, known in (("--conditions", conditions, CONDITIONS), ("--methods", methods, ALL_METHODS)):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"{name}: unknown {bad}; choose from {list(known)}")
    seeds = list(range(args.seeds))
    if args.quick:
        conditions, methods, seeds = ["flip0", "flip40"], ["dpo", "static_filter", "focalpo", "metapo"], [0]
    if args.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    stem = "quality" if args.epochs == STEPS_EPOCHS else f"quality_e{args.epochs}"
    out = output_path(args, "quality_quick" if args.quick else stem)
    prov = provenance("cpu", "benchmarks.quality")
    rows = []
    if args.resume and os.path.exists(out + ".csv"):
        rows = [{**r, "seed": int(r["seed"])} for r in csv.DictReader(open(out + ".csv"))]
    done = {(r["condition"], r["method"], int(r["seed"])) for r in rows}
    todo = [t for t in plan(conditions, methods, seeds) if t not in done]
    t0 = time.perf_counter()
    print(f"quality: {len(todo)} runs ({len(done)} already in {out}.csv), {args.workers} workers", flush=True)
    with tempfile.TemporaryDirectory() as work:
        if args.workers <= 1:
            results = (run_one(*t, work, args.quick, args.epochs, tuple(args.extra)) for t in todo)
        else:
            import multiprocessing as mp

            pool = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
            futures = [pool.submit(run_one, *t, work, args.quick, args.epochs, tuple(args.extra)) for t in todo]
            results = (f.result() for f in as_completed(futures))
        try:
            for k, r in enumerate(results, 1):
                rows.append({**r, **prov})
                write_csv(out + ".csv", rows)  # nothing lost if the benchmark is interrupted (--resume)
                el = time.perf_counter() - t0
                print(f"[{k}/{len(todo)}, {el / 60:.1f} min, ~{el / k * (len(todo) - k) / 60:.0f} min left] "
                      f"{r['condition']} {r['method']} seed {r['seed']}: accuracy {r['eval_accuracy']:.3f}, weights AUROC "
                      f"{_fmt(r['weights_auroc'])}, margin AUROC {_fmt(r['margin_auroc'])}, {r['wall_s']} s", flush=True)
        finally:
            if args.workers > 1:
                pool.shutdown(cancel_futures=True)
    # the report covers every row of the file (a --resume run adding a candidate shows it beside the rest)
    shown_c = [c for c in CONDITIONS if c in conditions or any(r["condition"] == c for r in rows)]
    shown_m = [m for m in ALL_METHODS if m in methods or any(r["method"] == m for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    md = render(rows, shown_c, shown_m, seeds, prov, args.quick, (time.perf_counter() - t0) / 60, args.epochs)
    with open(out + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
