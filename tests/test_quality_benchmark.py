"""The quality benchmark's reduced mode runs end to end (1 seed, 2 conditions, 3 methods)."""
import csv

from benchmarks.quality import main


def test_quality_quick_mode(tmp_path):
    main(["--quick", "--record", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "quality_quick.csv")))
    assert {(r["condition"], r["method"]) for r in rows} == {(c, m) for c in ("flip0", "flip40") for m in ("dpo", "focalpo", "metapo")}
    for r in rows:
        assert 0.0 <= float(r["eval_accuracy"]) <= 1.0
        if r["method"] == "dpo":  # all weights 1: no separation
            assert float(r["auroc_clean_vs_noisy"]) == 0.5 or r["condition"] == "flip0"
    md = (tmp_path / "quality_quick.md").read_text()
    assert "| flip40 | metapo |" in md and "commit" in md


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
