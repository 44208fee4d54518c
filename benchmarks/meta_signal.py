"""How much the meta-gradient's per-pair signal separates flipped from clean pairs on the default task.

    python -m benchmarks.meta_signal [--steps 20 150] [--pairs 256] [--val-objectives log sigmoid]
                                     [--preconditioners none adam] [--record]

For each checkpoint step: train the default task with plain DPO for that many steps, then compute
c_i = <grad L_val, grad l_i> (the quantity the meta-update sums, docs/math.md section 5) for
``--pairs`` random training pairs. This is done twice: against the validation split as is (as
noisy as the training data) and against the same pairs with their true labels
(``data.synthetic.clean_validation``). It reports the mean c_i of clean and flipped pairs, the
share with c_i > 0, and the AUROC of c_i for clean vs flipped. It also reports the AUROC of the
policy's own p = sigma(z), which is a feature the meta-network sees. ``--val-objectives`` repeats
it for each L_val loss (``meta.val_objective``: log = -log sigma(z), sigmoid = sigma(-z)), and
``--preconditioners`` for each inner preconditioner of c_i (adam: ``<g_meta, P g_i>`` with the trained
AdamW's diagonal P, :func:`metapo_fast.metapo.bilevel.adam_preconditioned`).
Writes benchmarks/results/meta_signal-<UTC time>.{md,csv}, or meta_signal.{md,csv} with --record.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from benchmarks.common import add_output_args, md_table, output_path, provenance, write_csv, write_md


def measure(steps: int, n_pairs: int, out_dir: str, val_objectives=("log",), extra=(), preconditioners=("none",)) -> list[dict]:
    from metapo_fast.data.batches import TrueLabels
    from metapo_fast.config import load_config
    from metapo_fast.train.parallel import DistInfo
    from metapo_fast.train.outputs import auroc
    from metapo_fast.metapo.bilevel import MetaLearner, adam_preconditioned, pair_gradient_dots
    from metapo_fast.metapo.weight_net import MetaWeightNet
    from metapo_fast.train.cli import _default_config
    from metapo_fast.train.loop import Trainer

    cfg = load_config(_default_config(), user_yaml=False, overrides=[f"train.output_dir={out_dir}", f"train.max_steps={max(steps, 1)}", "train.save_every=0",
                                          "train.eval_every=0", "meta.enabled=false", *extra])
    tr = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    for _ in range(steps):
        tr._train_step()
        tr.step += 1
    ds = tr.data.train
    flipped = ds.column("is_flipped") == 1
    idx = np.random.default_rng(0).choice(len(ds), n_pairs, replace=False)
    f = flipped[idx]
    batches = []
    for s in range(0, n_pairs, 32):
        b = tr.data.collator([ds[int(i)] for i in idx[s:s + 32]])
        b["ref_logps"] = tr.fwd.ref_logps(b)
        batches.append(b)
    z, _ = tr.fwd.margins(ds, tr.data.collator)
    rows = []
    for (name, val), objective in ((v, o) for v in (("validation split as is", tr.data.val),
                                                     ("validation with true labels", TrueLabels(tr.data.val)))
                                   for o in val_objectives):
        learner = MetaLearner(MetaWeightNet("linear", cfg.meta.features, cfg.meta_normalize, feature_norm=cfg.meta.feature_norm),
                              loss_type="sigmoid", loss_params=tr.cfg.loss.to_loss_params(), val_objective=objective)
        vb = tr.data.collator([val[i] for i in range(len(val))])
        vb["ref_logps"] = tr.fwd.ref_logps(vb)
        G, _ = learner.meta_gradient(tr.model, vb, tr.ref)
        for pre in preconditioners:
            D = adam_preconditioned(G, tr.eng.optimizer) if pre == "adam" else G
            c = torch.cat([pair_gradient_dots(tr.model, b, D, "sigmoid", tr.cfg.loss.to_loss_params(), tr.ref)
                           for b in batches]).numpy()
            rows.append({"dpo_steps": steps, "validation": name, "val_objective": objective, "preconditioner": pre,
                         "val_pairs": len(val), "pairs": n_pairs,
                         "mean_c_clean": f"{c[~f].mean():.3e}", "mean_c_flipped": f"{c[f].mean():.3e}",
                         "share_c_pos_clean": round(float((c[~f] > 0).mean()), 3),
                         "share_c_pos_flipped": round(float((c[f] > 0).mean()), 3),
                         "auroc_c_clean_vs_flipped": round(auroc(c, ~f), 3),
                         "auroc_p_clean_vs_flipped": round(auroc(z[idx], ~f), 3)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 150])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--val-objectives", nargs="+", default=["log"], choices=["log", "sigmoid"])
    ap.add_argument("--preconditioners", nargs="+", default=["none"], choices=["none", "adam"],
                    help="c_i's inner preconditioner: none = <g_meta, g_i>, adam = <g_meta, P g_i> with the AdamW state")
    add_output_args(ap, "meta_signal")
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides, e.g. data.val_fraction=0.2")
    a = ap.parse_args(argv)
    rows = []
    for s in a.steps:
        with tempfile.TemporaryDirectory() as d:
            new = measure(s, a.pairs, d, a.val_objectives, a.extra, a.preconditioners)
        rows += new
        print(md_table(new), flush=True)
    prov = provenance("cpu", "benchmarks.meta_signal")
    setup = (f"default task (2000 pairs, 30% flipped, tiny Llama, SFT warm-up 30 steps), DPO for the listed steps, "
             f"{a.pairs} random training pairs, one seed" + (f", overrides {' '.join(a.extra)}" if a.extra else ""))
    out = output_path(a, "meta_signal")
    write_csv(out + ".csv", rows)
    write_md(out + ".md", "Per-pair meta-gradient signal: c_i = <grad L_val, grad l_i>, clean vs flipped pairs", prov,
             setup, rows)
    print(f"wrote {out}.md and .csv")


if __name__ == "__main__":
    main()
