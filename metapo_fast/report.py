"""`python -m metapo_fast.report RUN_DIR [--out DIR] [--top 50]`: an HTML report (with PNG plots)
that explains a run's learned weighting (paper Sec. 4.7-4.9, App. C; docs/math.md section 8).

Figures and tables: learned coefficients over meta-updates (Fig. 3c); weights over (p, sigma) with
FocalPO's static p^gamma curve (Fig. 3a-b); the effective gradient factor w(1-p) against p
(Fig. 2); a weight histogram; weights by subset (Table 9); the Shapley share of each feature
(Table 8, exact for the linear net: phi_ij = v_j (s_hat_ij - mean_i s_hat_ij)); training curves;
the lowest-weight pairs with their prompt and both responses (the pairs most likely mislabelled).
Writes RUN_DIR/report/index.html, the PNGs beside it, and summary.md.
"""
from __future__ import annotations

import argparse
import csv
import html
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


def texts_for(run: dict, source_rows: np.ndarray) -> tuple[dict, Optional[str]]:
    """``{source_row: (prompt, chosen, rejected)}`` from the run's data source, or (empty, reason)."""
    d = run["config"].get("data", {})
    try:
        if d.get("path") is None:
            from .data.synthetic import make_synthetic_task

            s = d.get("synthetic", {})
            rows = make_synthetic_task(s.get("num_pairs", 2000), s.get("flip_fraction", 0.3), s.get("ambiguous_fraction", 0.0),
                                       s.get("seed", 0), s.get("num_eval_pairs", 500)).train_rows
        else:
            from .data.formats import load_rows

            rows = load_rows(d["path"], d.get("split", "train"), d.get("subset"))
    except (OSError, ValueError, ImportError) as exc:
        return {}, f"texts unavailable: {exc}"
    out = {}
    for r in source_rows:
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


def build_report(run_dir: str, out: Optional[str] = None, top: int = 50) -> str:
    run = load_run(run_dir)
    out = out or os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    gamma = float(run["config"].get("loss", {}).get("focal_gamma", 1.0))
    meta_on = bool(run["config"].get("meta", {}).get("enabled", False))
    figs = _plots(run, out, gamma)
    md = [f"# MetaPO report: {os.path.abspath(run_dir)}", ""]
    if not meta_on or np.allclose(run["w"], 1.0):
        md += ["The meta-learner was off (or all weights are 1): the weights carry no information.", ""]
    s = run["summary"]
    md += ["## Summary", "", *(f"- {k}: {v}" for k, v in s.items() if not isinstance(v, dict)), ""]
    md += ["## Weights by subset (paper Table 9)", "", "| subset | pairs | MetaPO weight | FocalPO weight p^gamma |", "|---|---|---|---|"]
    md += [f"| {n} | {c} | {a:.3f} | {b:.3f} |" for n, c, a, b in subset_table(run["p"], run["sigma"], run["w"], gamma)]
    net = load_meta_net(run_dir, run["config"].get("meta", {}))
    md += ["", "## Shapley share per feature (paper Table 8)", ""]
    if net is None or net.arch != "linear":
        md += ["Exact Shapley values need the linear meta-network from a checkpoint; none was found"
               + ("" if net is None else " (the run used the MLP)") + "."]
    else:
        phi = np.abs(shapley_values(net, run["s"])).mean(0)
        share = phi / phi.sum() if phi.sum() > 0 else phi
        md += ["| feature | mean abs Shapley | share |", "|---|---|---|"]
        md += [f"| {n} | {a:.4f} | {100 * b:.1f}% |" for n, a, b in zip(FEATURE_NAMES, phi, share)]
        temporal = sum(share[FEATURE_NAMES.index(k)] for k in ("ema_margin", "ema_std", "ema_kl"))
        md += ["", f"Temporal (EMA) features: {100 * temporal:.1f}% of the total."]
    order = np.argsort(run["w"], kind="mergesort")[:top]
    texts, why = texts_for(run, run["source_row"][order])
    md += ["", f"## The {len(order)} lowest-weight pairs (most likely mislabelled)", ""]
    if why:
        md.append(why)
    table = ["<table><tr><th>source row</th><th>weight</th><th>p</th><th>sigma</th><th>flipped</th><th>prompt</th>"
             "<th>chosen</th><th>rejected</th></tr>"]
    for i in order:
        sr = int(run["source_row"][i])
        pr, ch, rj = texts.get(sr, ("", "", ""))
        flipped = "" if run["flipped"] is None else str(int(run["flipped"][i]))
        table.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in
                                      (sr, f"{run['w'][i]:.3f}", f"{run['p'][i]:.3f}", f"{run['sigma'][i]:.3f}", flipped, pr, ch, rj)) + "</tr>")
        md.append(f"- row {sr}: w={run['w'][i]:.3f} p={run['p'][i]:.3f} flipped={flipped} | {pr!r} -> chosen {ch!r}, rejected {rj!r}")
    table.append("</table>")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    body = "".join(f"<h3>{html.escape(t)}</h3><img src='{n}'>" for n, t in figs)
    md_html = "<pre>" + html.escape("\n".join(l for l in md if not l.startswith("- row "))) + "</pre>"
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>MetaPO report</title></head><body>"
                f"<h1>MetaPO report</h1>{md_html}{body}<h2>Lowest-weight pairs</h2>{''.join(table)}</body></html>")
    return os.path.join(out, "index.html")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metapo_fast.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=50)
    args = ap.parse_args(argv)
    try:
        path = build_report(args.run_dir, args.out, args.top)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ImportError as exc:
        if str(exc) != MATPLOTLIB_MISSING:
            raise
        print(exc, file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
