"""What a run writes: metrics (one rank-0 line per logged step, ``metrics.jsonl`` flushed per line
so a crash loses nothing already logged, TensorBoard scalars when installed, a progress bar;
other ranks get a :class:`NullLogger`, so call sites never test the rank), the scores of the
summary (AUROC of weights for noisy vs clean pairs, Spearman), and the pair-weights table (the
pairs most likely mislabelled come first)."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from ..comm import world_size
from ..files import atomic_write_text
from ..ops.tracker_update import FEATURE_NAMES

log = logging.getLogger("metapo_fast.train")

__all__ = ["auroc", "spearman", "sigmoid", "write_pair_table", "RunLogger", "NullLogger", "make_logger", "batch_metrics",
           "step_record", "evaluate", "pair_weights", "finish", "mfu", "PEAK_BF16"]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties
    counted half (Mann-Whitney U with average ranks). NaN when a class is empty."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def rank(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def write_pair_table(path: str, pair_ids: np.ndarray, source_rows: np.ndarray, weights: np.ndarray,
                     p: np.ndarray, features: np.ndarray, extra: Optional[dict] = None) -> None:
    """CSV with one row per training pair, lowest weight first: source_row (row in the input file),
    pair_id (tracker row), weight, p = sigmoid(margin), the six features, ground-truth columns.
    ``weight`` and ``p`` keep 9 significant digits (every float32 distinct, so a ranking read back from
    the file, e.g. the report's AUROC, is the run's own: with 6, near-equal weights tied)."""
    order = np.argsort(weights, kind="mergesort")
    extra = extra or {}
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_row", "pair_id", "weight", "p", *FEATURE_NAMES, *extra])
        for i in order:
            w.writerow([int(source_rows[i]), int(pair_ids[i]), f"{weights[i]:.9g}", f"{p[i]:.9g}",
                        *(f"{x:.6g}" for x in features[i]), *(int(v[i]) for v in extra.values())])
    os.replace(tmp, path)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


def fmt_value(v) -> str:
    """A metric for people: floats to 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


@contextlib.contextmanager
def phase(what: str, show: bool = True):
    """A phase line on rank 0: ``what ...`` when it starts, ``what: done in X s`` when it ends."""
    t0 = time.perf_counter()
    if show:
        log.info("%s ...", what)
    yield
    if show:
        log.info("%s: done in %.1f s", what, time.perf_counter() - t0)


def versus_margin(weights_auroc: float, margin_auroc: float, tie: float = 0.02) -> str:
    """How the weights separate flipped pairs compared with the margin alone: "better than",
    "worse than", or "no better than" (within ``tie`` AUROC)."""
    if weights_auroc > margin_auroc + tie:
        return "better than"
    return "worse than" if weights_auroc < margin_auroc - tie else "no better than"


def summary_lines(s: dict, cfg) -> list[str]:
    """The end-of-run summary as a short two-column table: held-out accuracy, the weights against the
    run's own yardstick (the margin ranking), K and the meta overhead at that K, throughput, where
    the run directory and the report are."""
    rows = [("steps", str(s["steps"]))]
    if "eval/accuracy" in s:
        rows.append(("held-out accuracy (eval/accuracy)", f"{s['eval/accuracy']:.3f}"))
    m = cfg.meta
    if not m.enabled:
        rows.append(("pair weights", "none (meta.enabled=false: every pair weighs 1)"))
    elif s.get("weights_auroc_clean_vs_flipped") is not None and s.get("margin_auroc_clean_vs_flipped") is not None:
        wa, ma = s["weights_auroc_clean_vs_flipped"], s["margin_auroc_clean_vs_flipped"]
        verdict = versus_margin(wa, ma)
        rows.append(("weights AUROC, clean vs flipped", f"{wa:.3f}: they separate flipped pairs {verdict} the margin "
                                                          f"alone does (margin AUROC {ma:.3f})"))
    else:
        rows.append(("pair weights", f"mean {s['weight_mean']:.3f}, std {s['weight_std']:.3f} (no pairs known to be "
                                     "flipped: pair_weights.csv ranks them, lowest first)"))
    if m.enabled and m.weighting == "learned":
        start = f" from step {s['meta_start_step']}" if s.get("meta_start_step") else ""
        rows.append(("meta-updates", f"{s['meta_updates']} at K={m.interval}{start}, {s['meta_overhead_pct']:.1f}% of the "
                                     f"training time at this K"))
    rows.append(("tokens/s", f"{s['tokens_per_s']:.0f}"))
    if s.get("nonfinite_skips"):
        rows.append(("non-finite steps skipped", str(s["nonfinite_skips"])))
    rows += [("run directory", s["run_dir"]), ("report", f"python -m metapo_fast.report {s['run_dir']}")]
    width = max(len(k) for k, _ in rows)
    return ["summary:"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]


class RunLogger:
    """Writes metrics under ``run_dir`` with TRL's metric names (loss, rewards/chosen, ...)."""

    CONSOLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "metapo/weight_std", "lr", "tokens_per_s", "step_time_s",
                    "eval/accuracy", "eval/margin", "metapo/L_val")

    def __init__(self, run_dir: str, total_steps: int, tensorboard: bool = True, progress: bool = True, resume: bool = False):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a" if resume else "w", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra: metrics.jsonl still has everything
                self._tb = None
            else:
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        rec = {"step": step, **{k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                                for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if console:
            shown = " ".join(f"{k}={fmt_value(rec[k])}" for k in self.CONSOLE_KEYS if k in rec)
            msg = f"step {step}: {shown}"
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def info(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._f.close()


class NullLogger:
    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(is_main: bool, run_dir: str, total_steps: int, resume: bool = False, tensorboard: bool = True) -> "RunLogger | NullLogger":
    return RunLogger(run_dir, total_steps, tensorboard=tensorboard, resume=resume) if is_main else NullLogger()


# ---------------------------------------------------------------------------------------------
# Per-step metrics (TRL's names), evaluation, the end-of-run summary
# ---------------------------------------------------------------------------------------------
def batch_metrics(out, stats, w) -> dict:
    """One micro-batch's metrics as device tensors (read only on logging steps)."""
    m = {"loss": out.loss.detach(), "rewards/margins": stats.margins.mean(), "rewards/accuracies": stats.accuracies.mean(),
         "logps/chosen": stats.chosen_logps.mean(), "logps/rejected": stats.rejected_logps.mean(),
         "metapo/weight_mean": w.mean(), "metapo/weight_std": w.std(unbiased=False)}
    if stats.chosen_rewards is not None:
        m["rewards/chosen"] = stats.chosen_rewards.mean()
        m["rewards/rejected"] = stats.rejected_rewards.mean()
    if stats.kl is not None:
        m["metapo/kl"] = stats.kl.mean()
    return {k: v.float() for k, v in m.items()}


def step_record(tr, metrics: dict, extra: dict) -> dict:
    """The logged line of a step: its metrics (read from the device here), the meta-update's, the
    learning rate and throughput, and on GPUs peak memory and MFU."""
    c = tr.counters
    rec = {k: float(v) for k, v in metrics.items()}
    rec.update(extra, lr=tr.eng.lr(), epoch=tr.sampler.epoch, tokens_per_s=c["tokens"] / max(c["train_time_s"], 1e-9),
               step_time_s=c["train_time_s"] / tr.step, nonfinite_skips=c["nonfinite_skips"])
    if torch.cuda.is_available():
        rec["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        u = mfu(tr.model, rec["tokens_per_s"] * tr.dist.world_size)
        if u is not None:
            rec["mfu"] = u
    return rec


def evaluate(fwd, data) -> dict:
    """Clean held-out preference accuracy (z > 0), mean margin and mean KL (TRL-style ``eval/*``)."""
    if data.eval is None:
        return {}
    z, kl = fwd.margins(data.eval, data.collator)
    return {"eval/accuracy": float((z > 0).mean()), "eval/margin": float(z.mean()), "eval/kl": float(kl.mean())}


def pair_weights(tr):
    """``(z, features, w)`` of every training pair under the current meta-network, from the features
    of the pair's last visit (its margin and KL then, and the tracker's stored history)."""
    z, kl = tr.last_seen.double().cpu().numpy().T
    st = tr.tracker.state.detach().double().cpu().numpy()
    count = np.maximum(st[:, 5], 1.0)
    feats = np.stack([z, st[:, 0], np.sqrt(np.maximum(st[:, 4], 0) / count), st[:, 1], kl, st[:, 2]], 1)
    if tr.meta_net is None:
        w = np.ones(len(z))
    elif getattr(tr, "pair_filter", None) is not None:
        w = tr.pair_filter.pair_weights(torch.arange(len(z), device=tr.device), over_ranks=False).double().cpu().numpy()
    else:  # every rank holds every pair: normalised over them, without a collective (rank 0 alone may call this)
        with torch.no_grad():
            w = tr.meta_net(torch.as_tensor(feats, dtype=torch.float32, device=tr.device), over_ranks=False).double().cpu().numpy()
    return z, feats, w


def reference_footprint(ref, placement: str) -> dict:
    """Where the reference lives and how many of its parameters this rank holds (ZeRO-3: its
    partition; otherwise all of them)."""
    if ref is None:
        return {"reference": "none"}
    local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in ref.parameters())
    total = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in ref.parameters())
    return {"reference": placement, "reference_params_on_rank": int(local), "reference_params_total": int(total)}


def finish(tr) -> dict:
    """End of a run: evaluate, write ``pair_weights.csv``, the final checkpoint and model,
    ``summary.json`` (TRL's names where they exist), and print where everything is."""
    t_end = time.perf_counter()
    with phase("final evaluation", tr.dist.is_main):
        ev = evaluate(tr.fwd, tr.data)
    z, feats, w = pair_weights(tr)
    ds, c = tr.data.train, tr.counters
    extra = {k: ds.column(k) for k in ("is_flipped", "is_ambiguous") if k in ds.pairs.extra}
    summary = {"steps": tr.step, "run_dir": os.path.abspath(tr.run_dir), **ev,
               "tokens_per_s": c["tokens"] / max(c["train_time_s"], 1e-9),
               "meta_overhead_pct": 100 * c["meta_time_s"] / max(c["train_time_s"], 1e-9),
               "meta_updates": c["meta_updates"], "nonfinite_skips": c["nonfinite_skips"],
               **({"meta_start_step": tr.meta.start_step} if tr.meta is not None else {}),
               "weight_mean": float(w.mean()), "weight_std": float(w.std()), **reference_footprint(tr.ref, tr.ref_placement)}
    if "is_flipped" in extra and extra["is_flipped"].min() >= 0:
        clean = extra["is_flipped"] == 0
        summary["weights_auroc_clean_vs_flipped"] = auroc(w, clean)
        summary["margin_auroc_clean_vs_flipped"] = auroc(z, clean)  # the margin alone, as a yardstick for the weights
        summary["weights_spearman_cleanliness"] = spearman(w, clean.astype(float))
    if tr.meta_net is not None and tr.meta_net.arch == "linear":
        summary["coefficients"] = tr.meta_net.coefficients()
    if tr.dist.is_main:
        write_pair_table(os.path.join(tr.run_dir, "pair_weights.csv"), np.arange(len(ds)), ds.source_rows, w, sigmoid(z), feats, extra)
    tr.save(final=True)
    if tr.dist.is_main:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
        atomic_write_text(os.path.join(tr.run_dir, "summary.json"), json.dumps(clean, indent=1))
        tr.logger.log(tr.step, {k: v for k, v in summary.items() if isinstance(v, (int, float))}, console=False)
        for line in summary_lines(summary, tr.cfg):
            tr.logger.info(line)
    summary["finish_time_s"] = time.perf_counter() - t_end
    return summary


# Dense bf16 peak FLOP/s per GPU (vendor datasheets; no sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A40": 150e12}


def mfu(model, tokens_per_s_all_ranks: float) -> Optional[float]:
    """Model FLOPs utilisation: 6 * parameters * tokens/s over the GPUs' peak (None for unknown GPUs).
    The reference forward (2 * parameters per token) is not counted as useful work."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return 6 * n * tokens_per_s_all_ranks / (peak * world_size())
