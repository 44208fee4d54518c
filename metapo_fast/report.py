"""`python -m metapo_fast.report RUN_DIR [--out DIR] [--top 50] [--export-suspects F] [--drop-suspects F]`: an HTML report (with PNG plots)
that explains a run's learned weighting (paper Sec. 4.7-4.9, App. C; docs/math.md section 8).

Figures and tables: learned coefficients over meta-updates (Fig. 3c); weights over (p, sigma) with
FocalPO's static p^gamma curve (Fig. 3a-b); the effective gradient factor w(1-p) against p
(Fig. 2); a weight histogram; weights by subset (Table 9); the Shapley share of each feature
(Table 8, exact for the linear net: phi_ij = v_j (s_hat_ij - mean_i s_hat_ij)); training curves;
the lowest-weight pairs with their prompt and both responses (the pairs most likely mislabelled).
Writes RUN_DIR/report/index.html (a Jinja2 page: the verdict, i.e. how well the weights separate
flipped pairs beside the margin's own AUROC; the share of suspect pairs with the rule used; the
suspect table; then the plots and tables), the PNGs beside it, and summary.md.
``--export-suspects OUT.jsonl`` writes the suspect pairs' rows in the input format,
``--drop-suspects OUT.jsonl`` a copy of the training data without them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Optional

import numpy as np

from .ops.tracker_update import FEATURE_NAMES

SUBSETS = {  # paper Table 9
    "stable correct (p > 0.8, sigma < 0.1)": lambda p, s: (p > 0.8) & (s < 0.1),
    "volatile correct (p > 0.8, sigma > 0.3)": lambda p, s: (p > 0.8) & (s > 0.3),
    "persistent incorrect (p < 0.3)": lambda p, s: p < 0.3,
}


def _need(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"metapo_fast.report: {path} is missing (is this a metapo_fast run directory?)")
    return path


def load_run(run_dir: str) -> dict:
    with open(_need(os.path.join(run_dir, "pair_weights.csv"))) as f:
        rows = list(csv.DictReader(f))
    with open(_need(os.path.join(run_dir, "metrics.jsonl"))) as f:
        metrics = [json.loads(l) for l in f if l.strip()]
    import yaml

    with open(_need(os.path.join(run_dir, "config.yaml"))) as f:
        config = yaml.safe_load(f)
    summary = {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    col = lambda k: np.array([float(r[k]) for r in rows])  # noqa: E731
    run = {"rows": rows, "metrics": metrics, "config": config, "summary": summary, "w": col("weight"), "p": col("p"),
           "s": np.stack([col(k) for k in FEATURE_NAMES], 1), "source_row": np.array([int(r["source_row"]) for r in rows])}
    run["sigma"] = run["s"][:, FEATURE_NAMES.index("std")]
    run["margin"] = col("margin")
    run["flipped"] = np.array([int(r["is_flipped"]) for r in rows]) if rows and "is_flipped" in rows[0] else None
    return run


def shapley_values(net, s: np.ndarray) -> np.ndarray:
    """Exact Shapley values of the linear meta-net's pre-activation, ``(N, 6)``; each row sums to
    ``pre_i - mean(pre)``."""
    import torch

    return net.shapley(torch.as_tensor(s, dtype=torch.float32)).double().numpy()


def load_meta_net(run_dir: str, meta_cfg: Optional[dict] = None):
    """The MetaWeightNet of the newest valid checkpoint (with its feature normalisation), or None."""
    from .train.state import CheckpointManager, load_trainer_state
    from .metapo.weight_net import MetaWeightNet

    found = CheckpointManager(run_dir).latest_valid(deep=False) if os.path.isdir(os.path.join(run_dir, "checkpoints")) else None
    if found is None:
        return None
    st = load_trainer_state(found[1]).get("meta")  # no arbitrary unpickling (CheckpointError if unsafe)
    if not st:
        return None
    sd = st["net"]
    arch = "linear" if "v" in sd else "mlp"
    m = meta_cfg or {}
    # the feature scale's bias correction depends on the run's momentum: rebuild with the run's settings
    net = MetaWeightNet(arch=arch, features=m.get("features", "all"), stats_momentum=m.get("stats_momentum", 0.99),
                        hidden=sd["hidden_layer.weight"].shape[0] if arch == "mlp" else 32,
                        feature_norm=m.get("feature_norm", "rms"))
    net.load_state_dict(sd)
    return net


def source_rows(run: dict) -> tuple[list, Optional[str]]:
    """The run's training rows as they were read (their index is ``source_row``), or ([], reason)."""
    d = run["config"].get("data", {})
    try:
        if d.get("path") is None:
            from .data.synthetic import make_synthetic_task

            s = d.get("synthetic", {})
            rows = make_synthetic_task(s.get("num_pairs", 2000), s.get("flip_fraction", 0.3), s.get("ambiguous_fraction", 0.0),
                                       s.get("seed", 0), s.get("num_eval_pairs", 500),
                                       oracle_labels=s.get("oracle_labels", False)).train_rows
        else:
            from .data.formats import load_rows

            rows = load_rows(d["path"], d.get("split", "train"), d.get("subset"))
    except (OSError, ValueError, ImportError) as exc:
        return [], f"texts unavailable: {exc}"
    return rows, None


def texts_for(run: dict, source_rows_: np.ndarray) -> tuple[dict, Optional[str]]:
    """``{source_row: (prompt, chosen, rejected)}`` from the run's data source, or (empty, reason)."""
    rows, why = source_rows(run)
    if why:
        return {}, why
    out = {}
    for r in source_rows_:
        if 0 <= r < len(rows):
            row = rows[int(r)]
            out[int(r)] = tuple(str(row.get(k, "")) for k in ("prompt", "chosen", "rejected"))
    return out, None


MATPLOTLIB_MISSING = ("python -m metapo_fast.report draws its plots with matplotlib, which is not installed: "
                      "pip install 'metapo-fast[report]' (or pip install matplotlib)")


def _plots(run: dict, out: str, gamma: float) -> list[tuple[str, str]]:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(MATPLOTLIB_MISSING) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    w, p, sig, fl = run["w"], run["p"], run["sigma"], run["flipped"]
    pp = np.linspace(0, 1, 200)

    def save(name, title):
        plt.tight_layout()
        plt.savefig(os.path.join(out, name), dpi=110)
        plt.close()
        figs.append((name, title))

    coef_steps = [m for m in run["metrics"] if any(k.startswith("metapo/coef/") for k in m)]
    if coef_steps:
        plt.figure(figsize=(6, 3.5))
        for k in [*FEATURE_NAMES, "bias"]:
            plt.plot([m["step"] for m in coef_steps], [m.get(f"metapo/coef/{k}", np.nan) for m in coef_steps], label=k)
        plt.xlabel("step"); plt.ylabel("coefficient"); plt.legend(fontsize=7, ncol=2)
        save("coefficients.png", "Learned coefficients over meta-updates (paper Fig. 3c)")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(pp, pp ** gamma, color="tab:orange"); ax[0].set_title(f"FocalPO: w = p^{gamma:g}"); ax[0].set_xlabel("p")
    sc = ax[1].scatter(p, sig, c=w, s=6, cmap="viridis"); ax[1].set_xlabel("p"); ax[1].set_ylabel("sigma (f2)")
    ax[1].set_title("MetaPO weight over (p, sigma)"); fig.colorbar(sc, ax=ax[1])
    save("weights_p_sigma.png", "Weights over (p, sigma) beside FocalPO's static curve (paper Fig. 3a-b)")
    plt.figure(figsize=(5.5, 3.5))
    if fl is not None:
        plt.scatter(p[fl == 0], (w * (1 - p))[fl == 0], s=5, label="clean", alpha=0.6)
        plt.scatter(p[fl == 1], (w * (1 - p))[fl == 1], s=5, marker="x", label="flipped", alpha=0.6)
    else:
        plt.scatter(p, w * (1 - p), s=5, label="pairs")
    plt.plot(pp, pp ** gamma * (1 - pp), color="black", label="FocalPO p^g (1-p)")
    plt.xlabel("p"); plt.ylabel("w (1 - p)"); plt.legend(fontsize=8)
    save("gradient_factor.png", "Effective gradient factor w(1-p) against p (paper Fig. 2)")
    plt.figure(figsize=(5.5, 3.5))
    if fl is not None:
        plt.hist([w[fl == 0], w[fl == 1]], bins=40, label=["clean", "flipped"], stacked=False)
        plt.legend()
    else:
        plt.hist(w, bins=40)
    plt.xlabel("weight"); plt.ylabel("pairs")
    save("weight_hist.png", "Weight histogram")
    curves = [m for m in run["metrics"] if "loss" in m and "rewards/accuracies" in m]
    evals = [m for m in run["metrics"] if "eval/accuracy" in m]
    if curves:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].plot([m["step"] for m in curves], [m["loss"] for m in curves]); ax[0].set_title("loss")
        ax[1].plot([m["step"] for m in curves], [m["rewards/accuracies"] for m in curves], label="train rewards/accuracies")
        if evals:
            ax[1].plot([m["step"] for m in evals], [m["eval/accuracy"] for m in evals], "o-", label="eval/accuracy")
        ax[1].legend(fontsize=8)
        save("curves.png", "Training curves")
    return figs


def subset_table(p: np.ndarray, sigma: np.ndarray, w: np.ndarray, gamma: float) -> list[tuple[str, int, float, float]]:
    """(subset, count, mean MetaPO weight, mean FocalPO weight p^gamma) per Table-9 subset."""
    out = []
    for name, f in SUBSETS.items():
        m = f(p, sigma)
        n = int(m.sum())
        out.append((name, n, float(w[m].mean()) if n else float("nan"), float((p[m] ** gamma).mean()) if n else float("nan")))
    return out


def suspects(run: dict) -> tuple[np.ndarray, str]:
    """Which pairs the report flags as likely mislabelled, and the rule in words. A pair is suspect
    when the trained policy prefers its rejected response (p = sigmoid(margin) < 0.5) and, if the run
    learned weights, its weight is below the median weight (the meta-learner agrees it is suspect)."""
    p, w = run["p"], run["w"]
    if np.allclose(w, w[0] if len(w) else 1.0):
        return p < 0.5, "the trained policy prefers the rejected response (p = sigmoid(margin) < 0.5)"
    return (p < 0.5) & (w < np.median(w)), ("the trained policy prefers the rejected response (p = sigmoid(margin) < 0.5) "
                                            "and the learned weight is below the median weight")


def verdict(run: dict) -> list[str]:
    """Plain sentences: how well the weights separate flipped pairs, beside the margin yardstick."""
    from .train.outputs import auroc, spearman, versus_margin

    w, p, fl = run["w"], run["p"], run["flipped"]
    if np.allclose(w, w[0] if len(w) else 1.0):
        return ["This run learned no pair weights (the meta-learner was off, or all weights are equal): "
                "the suspects below come from the policy's margin alone."]
    if fl is not None and fl.min() >= 0 and 0 < fl.sum() < len(fl):
        clean = fl == 0
        wa, ma = auroc(w, clean), auroc(p, clean)
        word = versus_margin(wa, ma)
        out = [f"The learned weights separate the {int(fl.sum())} flipped pairs from the clean ones {word} the policy's "
               f"own margin does: AUROC {wa:.3f} for the weights, {ma:.3f} for the margin (0.5 = chance)."]
        if word == "worse than":
            out.append("To find mislabelled pairs in this run, rank them by the margin (the p column), not by the weight.")
        return out
    return [f"No pairs are known to be flipped, so the weights cannot be scored here. They follow the margin "
            f"ranking with Spearman r = {spearman(w, p):.3f} (1 = the weights add nothing to the margin)."]


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MetaPO report: {{ run_dir }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { max-width: 28em; white-space: pre-wrap; word-break: break-word; }
tr.suspect td:first-child { border-left: 4px solid #c0392b; }
.verdict { font-size: 1.1em; background: #f8f8f0; border-left: 4px solid #888; padding: 0.5em 1em; }
img { max-width: 100%; width: 720px; display: block; margin: 0.5em 0 1.5em; }
</style></head><body>
<h1>MetaPO report</h1>
<p>{{ run_dir }}</p>
<h2>Verdict</h2>
<div class="verdict">{% for line in verdict %}<p>{{ line }}</p>{% endfor %}</div>
<h2>Suspect pairs</h2>
<p><b>{{ n_suspect }} of {{ n_pairs }} pairs ({{ "%.1f"|format(share) }}%)</b> are flagged as likely mislabelled. Rule: {{ rule }}.{% if rule_check %} {{ rule_check }}{% endif %}</p>
{% if texts_note %}<p>{{ texts_note }}</p>{% endif %}
<table><tr><th>source row</th><th>flag</th><th>weight</th><th>margin</th><th>p</th>{% if has_flipped %}<th>flipped (known)</th>{% endif %}<th>prompt</th><th>chosen</th><th>rejected</th></tr>
{% for r in pairs %}<tr{% if r.suspect %} class="suspect"{% endif %}><td class="num">{{ r.source_row }}</td><td>{{ "suspect" if r.suspect else "" }}</td><td class="num">{{ "%.3f"|format(r.weight) }}</td><td class="num">{{ "%.3f"|format(r.margin) }}</td><td class="num">{{ "%.3f"|format(r.p) }}</td>{% if has_flipped %}<td>{{ "yes" if r.flipped else "no" }}</td>{% endif %}<td class="text">{{ r.prompt }}</td><td class="text">{{ r.chosen }}</td><td class="text">{{ r.rejected }}</td></tr>
{% endfor %}</table>
<p>The {{ pairs|length }} lowest-weight pairs are shown (<code>--top</code>); <code>pair_weights.csv</code> has all of them, lowest weight first.
<code>python -m metapo_fast.report RUN_DIR --export-suspects suspects.jsonl</code> writes the flagged rows in the input format, <code>--drop-suspects clean.jsonl</code> a copy of the data without them.</p>
<h2>Run summary</h2>
<table>{% for k, v in summary %}<tr><th>{{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}</table>
{% if coefs %}<h2>Learned coefficients</h2>
<p>The linear meta-network's coefficients on the normalised features (w = softplus(v . s + b)): a positive coefficient raises the weight of pairs with a larger feature.</p>
<table><tr><th>coefficient</th><th>final</th><th>after the first meta-update</th><th>min</th><th>max</th></tr>
{% for n, f, a, lo, hi in coefs %}<tr><td>{{ n }}</td><td class="num">{{ "%+.4f"|format(f) }}</td><td class="num">{{ "%+.4f"|format(a) }}</td><td class="num">{{ "%+.4f"|format(lo) }}</td><td class="num">{{ "%+.4f"|format(hi) }}</td></tr>
{% endfor %}</table>{% endif %}
<h2>Plots</h2>
{% for name, title in figs %}<h3>{{ title }}</h3><img src="{{ name }}" alt="{{ title }}">
{% endfor %}
<h2>Weights by subset (paper Table 9)</h2>
{% if subsets %}<table><tr><th>subset</th><th>pairs</th><th>MetaPO weight</th><th>FocalPO weight p^gamma</th></tr>
{% for n, c, a, b in subsets %}<tr><td>{{ n }}</td><td class="num">{{ c }}</td><td class="num">{{ "%.3f"|format(a) }}</td><td class="num">{{ "%.3f"|format(b) }}</td></tr>
{% endfor %}</table>{% endif %}
{% if subsets_note %}<p>{{ subsets_note }}</p>{% endif %}
<h2>Shapley share per feature (paper Table 8)</h2>
{% if shapley %}<table><tr><th>feature</th><th>mean |Shapley|</th><th>share</th></tr>
{% for n, a, b in shapley %}<tr><td>{{ n }}</td><td class="num">{{ "%.4f"|format(a) }}</td><td class="num">{{ "%.1f"|format(100 * b) }}%</td></tr>
{% endfor %}</table>{% endif %}<p>{{ shapley_note }}</p>
</body></html>
"""


def coefficient_table(run: dict) -> list[tuple[str, float, float, float, float]]:
    """The linear meta-network's coefficients (on normalised features, and the bias): final value
    (summary.json), value after the first meta-update and range over the run (metrics.jsonl);
    empty when the run learned none."""
    final = run["summary"].get("coefficients") or {}
    rows = []
    for name, f in final.items():
        seq = [m[f"metapo/coef/{name}"] for m in run["metrics"] if f"metapo/coef/{name}" in m]
        seq = seq or [f]
        rows.append((name, float(f), float(seq[0]), float(min(seq + [f])), float(max(seq + [f]))))
    return rows


def build_report(run_dir: str, out: Optional[str] = None, top: int = 50) -> str:
    from .extras import require

    jinja2 = require("jinja2")

    run = load_run(run_dir)
    out = out or os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    gamma = float(run["config"].get("loss", {}).get("focal_gamma", 1.0))
    meta_on = bool(run["config"].get("meta", {}).get("enabled", False))
    figs = _plots(run, out, gamma)
    flag, rule = suspects(run)
    fl = run["flipped"]
    rule_check = ""
    if fl is not None and fl.min() >= 0 and fl.sum() > 0:
        tp = int((flag & (fl == 1)).sum())
        rule_check = (f"Against the known flips: {tp} of the {int(flag.sum())} flagged pairs are flipped (precision "
                      f"{tp / max(int(flag.sum()), 1):.2f}), {tp} of the {int(fl.sum())} flipped pairs are flagged (recall "
                      f"{tp / int(fl.sum()):.2f}).")
    words = verdict(run)
    md = [f"# MetaPO report: {os.path.abspath(run_dir)}", "", "## Verdict", "", *words, ""]
    if not meta_on or np.allclose(run["w"], 1.0):
        md += ["The meta-learner was off (or all weights are 1): the weights carry no information.", ""]
    md += ["## Suspect pairs", "", f"{int(flag.sum())} of {len(flag)} pairs ({100 * flag.mean() if len(flag) else 0:.1f}%) flagged. "
           f"Rule: {rule}. {rule_check}".strip(), ""]
    s = run["summary"]
    from .train.outputs import fmt_value

    summary = [(k, fmt_value(v)) for k, v in s.items() if not isinstance(v, (dict, list))]
    md += ["## Summary", "", "| key | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary), ""]
    coefs = coefficient_table(run)
    if coefs:
        md += ["## Learned coefficients", "", "| coefficient | final | after the first meta-update | min | max |",
               "|---|---|---|---|---|", *(f"| {n} | {f:+.4f} | {a:+.4f} | {lo:+.4f} | {hi:+.4f} |" for n, f, a, lo, hi in coefs), ""]
    table9 = subset_table(run["p"], run["sigma"], run["w"], gamma)
    kept = [t for t in table9 if t[1] > 0]
    dropped = [t[0] for t in table9 if t[1] == 0]
    subsets_note = ""
    if dropped:
        subsets_note = (f"No pair of this run falls in {', '.join(dropped)}: the paper's thresholds do not fit its range "
                        f"(p {run['p'].min():.2f}-{run['p'].max():.2f}, sigma {run['sigma'].min():.3f}-{run['sigma'].max():.3f}), "
                        f"so {'that subset is' if len(dropped) == 1 else 'those subsets are'} left out.")
    md += ["## Weights by subset (paper Table 9)", ""]
    if kept:
        md += ["| subset | pairs | MetaPO weight | FocalPO weight p^gamma |", "|---|---|---|---|"]
        md += [f"| {n} | {c} | {a:.3f} | {b:.3f} |" for n, c, a, b in kept]
    md += ["", subsets_note] if subsets_note else []
    net = load_meta_net(run_dir, run["config"].get("meta", {}))
    md += ["", "## Shapley share per feature (paper Table 8)", ""]
    shapley, shapley_note = [], ""
    if net is None or net.arch != "linear":
        shapley_note = ("Exact Shapley values need the linear meta-network from a checkpoint; none was found"
                        + ("" if net is None else " (the run used the MLP)") + ".")
        md += [shapley_note]
    else:
        phi = np.abs(shapley_values(net, run["s"])).mean(0)
        share = phi / phi.sum() if phi.sum() > 0 else phi
        shapley = list(zip(FEATURE_NAMES, phi.tolist(), share.tolist()))
        md += ["| feature | mean abs Shapley | share |", "|---|---|---|"]
        md += [f"| {n} | {a:.4f} | {100 * b:.1f}% |" for n, a, b in shapley]
        temporal = sum(share[FEATURE_NAMES.index(k)] for k in ("ema_margin", "ema_std", "ema_kl"))
        shapley_note = f"Temporal (EMA) features: {100 * temporal:.1f}% of the total."
        md += ["", shapley_note]
    order = np.argsort(run["w"], kind="mergesort")[:top]
    texts, why = texts_for(run, run["source_row"][order])
    md += ["", f"## The {len(order)} lowest-weight pairs (most likely mislabelled)", ""]
    if why:
        md.append(why)
    margin = run["margin"]
    pairs = []
    for i in order:
        sr = int(run["source_row"][i])
        pr, ch, rj = texts.get(sr, ("", "", ""))
        flipped = "" if fl is None else str(int(fl[i]))
        pairs.append({"source_row": sr, "suspect": bool(flag[i]), "weight": float(run["w"][i]), "margin": float(margin[i]),
                      "p": float(run["p"][i]), "flipped": fl is not None and fl[i] == 1, "prompt": pr, "chosen": ch, "rejected": rj})
        md.append(f"- row {sr}: w={run['w'][i]:.3f} p={run['p'][i]:.3f} flipped={flipped} | {pr!r} -> chosen {ch!r}, rejected {rj!r}")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    page = jinja2.Environment(autoescape=True).from_string(_TEMPLATE).render(
        run_dir=os.path.abspath(run_dir), verdict=words, n_suspect=int(flag.sum()), n_pairs=len(flag),
        share=100 * flag.mean() if len(flag) else 0.0, rule=rule, rule_check=rule_check, texts_note=why, pairs=pairs,
        has_flipped=fl is not None, summary=summary, coefs=coefs, figs=figs, subsets=kept, subsets_note=subsets_note, shapley=shapley,
        shapley_note=shapley_note)
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(page)
    return os.path.join(out, "index.html")


def export_suspects(run_dir: str, path: str, drop: bool = False) -> int:
    """Write the suspect pairs' source rows (``drop``: every other row) as JSONL in the input
    format; returns the number of rows written. Raises ValueError when the source rows are unavailable."""
    run = load_run(run_dir)
    flag, _ = suspects(run)
    rows, why = source_rows(run)
    if why:
        raise ValueError(f"metapo_fast.report: cannot export: {why}")
    flagged = {int(r) for r in run["source_row"][flag]}
    keep = [i for i in range(len(rows)) if (i not in flagged) == drop]
    from .files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(dict(rows[i]), ensure_ascii=False) + "\n" for i in keep))
    return len(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metapo_fast.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=50)
    ap.add_argument("--export-suspects", default=None, metavar="OUT.jsonl", help="write the suspect pairs' rows in the input format")
    ap.add_argument("--drop-suspects", default=None, metavar="OUT.jsonl", help="write a copy of the training data without them")
    args = ap.parse_args(argv)
    try:
        for path, drop in ((args.export_suspects, False), (args.drop_suspects, True)):
            if path:
                n = export_suspects(args.run_dir, path, drop=drop)
                print(f"{'kept' if drop else 'exported'} {n} rows: {path}")
        path = build_report(args.run_dir, args.out, args.top)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except ImportError as exc:
        from .extras import MissingExtraError

        if str(exc) != MATPLOTLIB_MISSING and not isinstance(exc, MissingExtraError):
            raise
        print(exc, file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
