"""The quality benchmark: its reduced mode end to end, and the report's arithmetic."""
import csv

import pytest

from benchmarks.quality import main


def test_quality_quick_mode(tmp_path):
    main(["--quick", "--record", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "quality_quick.csv")))
    methods = ("dpo", "static_filter", "focalpo", "metapo")
    assert {(r["condition"], r["method"]) for r in rows} == {(c, m) for c in ("flip0", "flip40") for m in methods}
    for r in rows:
        assert 0.0 <= float(r["eval_accuracy"]) <= 1.0
        if r["method"] == "dpo" and r["condition"] == "flip40":  # all weights 1: no separation
            assert float(r["weights_auroc"]) == 0.5 and 0.0 <= float(r["margin_auroc"]) <= 1.0
    sf = next(r for r in rows if r["method"] == "static_filter" and r["condition"] == "flip40")
    assert float(sf["weights_auroc"]) != 0.5  # the filter ran: weights 0 and n / (n - k), not all equal
    md = (tmp_path / "quality_quick.md").read_text()
    assert "| metapo |" in md and "commit" in md and "## Issue #13 item 3, checked on these rows (metapo)" in md


def _rows(table):
    """rows from {(condition, method): [accuracy per seed]}"""
    return [{"condition": c, "method": m, "seed": s, "eval_accuracy": a}
            for (c, m), accs in table.items() for s, a in enumerate(accs)]


def test_paired_difference_gap_closed_and_criteria():
    """The report's arithmetic on made-up rows: paired per-seed differences, the share of the
    DPO -> oracle gap closed, and a criterion that fails when MetaPO loses."""
    from benchmarks.quality import criteria, gap_closed, paired

    rows = _rows({("flip40", "dpo"): [0.60, 0.70, 0.62, 0.58, 0.65], ("flip40", "dpo_oracle"): [0.90, 0.95, 0.92, 0.88, 0.95],
                  ("flip40", "metapo"): [0.85, 0.85, 0.60, 0.80, 0.85], ("flip40", "cdpo"): [0.70] * 5})
    d = paired(rows, "flip40", "metapo")
    assert d == pytest.approx([0.25, 0.15, -0.02, 0.22, 0.20])
    assert gap_closed(rows, "flip40", "metapo") == pytest.approx(sum(d) / sum([0.30, 0.25, 0.30, 0.30, 0.30]))
    lines = criteria(rows, ["flip40"], ["dpo", "dpo_oracle", "cdpo", "metapo"])
    assert any(l.startswith("- PASS: flip40: closes 55%") and "wins 4/5" in l for l in lines), lines
    assert any(l.startswith("- PASS: flip40: not below the best baseline (cdpo") for l in lines), lines
    # a filter that reads the true labels is a yardstick, not a baseline, however high it scores
    rows_o = rows + _rows({("flip40", "oracle_filter_from_1of3"): [0.99] * 5})
    lines = criteria(rows_o, ["flip40"], ["dpo", "dpo_oracle", "cdpo", "metapo", "oracle_filter_from_1of3"])
    assert any(l.startswith("- PASS: flip40: not below the best baseline (cdpo") for l in lines), lines
    rows = [r if r["method"] != "metapo" else {**r, "eval_accuracy": r["eval_accuracy"] - 0.15} for r in rows]
    lines = criteria(rows, ["flip40"], ["dpo", "dpo_oracle", "cdpo", "metapo"])
    assert any(l.startswith("- FAIL: flip40: closes") for l in lines) and any(l.startswith("- FAIL: flip40: not below") for l in lines)


def test_benchmark_output_is_a_new_file_unless_recorded(tmp_path):
    """Without --record a benchmark writes <stem>-<UTC time>: the committed results are never overwritten."""
    import argparse

    from benchmarks.common import add_output_args, output_path

    ap = argparse.ArgumentParser()
    add_output_args(ap, "tracker")
    trial = output_path(ap.parse_args(["--out-dir", str(tmp_path)]), "tracker")
    assert trial.startswith(str(tmp_path / "tracker-")) and len(trial) == len(str(tmp_path / "tracker-20261201T061500"))
    assert output_path(ap.parse_args(["--out-dir", str(tmp_path), "--record"]), "tracker") == str(tmp_path / "tracker")
    assert output_path(ap.parse_args(["--out-dir", str(tmp_path), "--record", "--name", "x"]), "tracker") == str(tmp_path / "x")


def test_weights_diagnosis_measures_prompt_concentration(tmp_path):
    """eta^2 is the between-prompt share of variance, and analyse() reads a run's suppressed set:
    its precision against the known flips and its concentration by prompt."""
    import numpy as np

    from benchmarks.weights_diagnosis import analyse, eta_squared
    from metapo_fast.data.synthetic import make_synthetic_task

    g = np.array([0, 0, 1, 1])
    assert eta_squared(np.array([1.0, 1.0, 3.0, 3.0]), g) == pytest.approx(1.0)
    assert eta_squared(np.array([1.0, 3.0, 1.0, 3.0]), g) == pytest.approx(0.0)
    assert eta_squared(np.array([0.0, 2.0, 3.0, 3.0]), g) == pytest.approx(4 / 6)  # between 2*1 + 2*1, total 4+0+1+1
    task = make_synthetic_task(2000, 0.2, 0.0, 3, 500)
    prompts = sorted({r["prompt"] for r in task.train_rows})
    worst = set(prompts[:20])  # suppress every pair of 20 prompts: difficulty, not label
    rows = [{"source_row": i, "weight": 0.0 if r["prompt"] in worst else 1.0, "margin": 0.0 if r["prompt"] in worst else 1.0,
             "is_flipped": int(r["is_flipped"])} for i, r in enumerate(task.train_rows)]
    with open(tmp_path / "pair_weights.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    a = analyse(str(tmp_path), "flip20", 3)
    assert a["chance"] == pytest.approx(0.2) and abs(a["precision"] - 0.2) < 0.08  # no better than chance
    assert a["top10_prompt_share"] > 0.4 and a["prompts_half_suppressed"] >= 15
    assert a["eta2_weight_clean"] == pytest.approx(1.0) and a["eta2_margin_clean"] == pytest.approx(1.0)


def test_gradient_shares_by_hand():
    """sigma(-z) is DPO's per-pair gradient scale: z = 0 gives 1/2, z = log 3 gives 1/4."""
    import numpy as np

    from benchmarks.weights_diagnosis import gradient_shares

    z = np.array([0.0, np.log(3.0), 0.0, np.log(3.0)])  # sigma(-z): 1/2, 1/4, 1/2, 1/4
    flipped = np.array([True, False, False, False])
    drop = np.array([False, False, True, False])  # a filter that drops one clean pair
    got = gradient_shares(z, flipped, {"f": drop})
    assert got["flipped_grad_share"] == pytest.approx(0.5 / 1.5)
    assert got["flipped_grad_share_after_f"] == pytest.approx(0.5 / 1.0)
    assert got["clean_grad_lost_by_f"] == pytest.approx(0.5 / 1.0)
