"""Evaluation and run outputs: held-out preference accuracy, AUROC of weights for noisy vs clean
pairs, and the pair-weights table (the pairs most likely mislabelled come first)."""
from __future__ import annotations

import csv
import os
from typing import Optional

import numpy as np
import torch

from .reference import FEATURE_NAMES

__all__ = ["auroc", "spearman", "write_pair_table"]


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
    pair_id (tracker row), weight, p = sigmoid(margin), the six features, ground-truth columns."""
    order = np.argsort(weights, kind="mergesort")
    extra = extra or {}
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_row", "pair_id", "weight", "p", *FEATURE_NAMES, *extra])
        for i in order:
            w.writerow([int(source_rows[i]), int(pair_ids[i]), f"{weights[i]:.6g}", f"{p[i]:.6g}",
                        *(f"{x:.6g}" for x in features[i]), *(int(v[i]) for v in extra.values())])
    os.replace(tmp, path)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


@torch.no_grad()
def weights_for(meta_net, features: torch.Tensor) -> torch.Tensor:
    """Weights of the meta-network for features (no statistics update)."""
    if meta_net is None:
        return torch.ones(features.shape[0])
    return meta_net(features.to(next(meta_net.parameters()).device)).float().cpu()
