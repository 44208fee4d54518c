"""The HTML report builds from a run directory; its numbers are checked by hand (math.md section 8)."""
import os

import numpy as np
import pytest
import torch

from metapo_fast.metapo.weight_net import MetaWeightNet
from metapo_fast.report import build_report, main, shapley_values, subset_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny MetaPO run (about 10 s): the report reads exactly what the trainer writes."""
    from metapo_fast.train.cli import main as train

    out = str(tmp_path_factory.mktemp("run") / "r")
    assert train(["data.synthetic.num_pairs=160", "data.synthetic.num_eval_pairs=40", "data.val_fraction=0.1",
                  "train.per_device_batch_size=8", "train.sft_warmup_steps=5", "train.max_steps=9", "meta.interval=3",
                  "meta.val_batch_size=8", "train.save_every=9", f"train.output_dir={out}"]) == 0
    return out


def test_report_builds_with_valid_pngs_and_escaped_texts(run_dir):
    # a response containing markup must be escaped in the lowest-weight table
    path = build_report(run_dir, top=200)
    html_text = open(path).read()
    pngs = [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".png")]
    assert {"coefficients.png", "weights_p_sigma.png", "gradient_factor.png", "weight_hist.png", "curves.png"} <= set(pngs)
    import matplotlib.image as mpimg

    for f in pngs:
        assert f'src="{f}"' in html_text
        data = open(os.path.join(os.path.dirname(path), f), "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert mpimg.imread(os.path.join(os.path.dirname(path), f)).size > 0
    md = open(os.path.join(os.path.dirname(path), "summary.md")).read()
    assert "Shapley share per feature" in md and "| ema_std |" in md
    assert "<script>" not in html_text
    rows = [l for l in md.splitlines() if l.startswith("- row ")]
    weights = [float(l.split("w=")[1].split()[0]) for l in rows]
    assert weights == sorted(weights) and "+" in rows[0]  # texts of the synthetic task were found


def test_learned_coefficients_table(run_dir):
    """The report shows the learned coefficients (issue #13): final values equal summary.json's, the
    first value is the first meta-update's logged one, and the range covers every logged value."""
    import json

    from metapo_fast.report import coefficient_table, load_run

    run = load_run(run_dir)
    rows = {n: (f, a, lo, hi) for n, f, a, lo, hi in coefficient_table(run)}
    final = json.load(open(os.path.join(run_dir, "summary.json")))["coefficients"]
    assert set(rows) == set(final) and "margin" in rows and "bias" in rows
    logged = [m for m in run["metrics"] if "metapo/coef/margin" in m]
    assert len(logged) == 3  # 9 steps, K = 3
    for n, (f, a, lo, hi) in rows.items():
        seq = [m[f"metapo/coef/{n}"] for m in logged]
        assert f == final[n] and a == seq[0] and lo == min(seq + [f]) and hi == max(seq + [f])
    assert any(abs(a) > 0 for n, (_, a, _, _) in rows.items() if n != "bias")  # the first update moved phi
    md = open(os.path.join(os.path.dirname(build_report(run_dir, out=os.path.join(run_dir, "r3"))), "summary.md")).read()
    assert "## Learned coefficients" in md and f"| margin | {final['margin']:+.4f} |" in md


def test_html_escaping_of_pair_texts(run_dir, monkeypatch):
    import metapo_fast.report as R

    monkeypatch.setattr(R, "texts_for", lambda run, rows: ({int(r): ("<script>alert(1)</script>", "a&b", "<b>") for r in rows}, None))
    text = open(build_report(run_dir, out=os.path.join(run_dir, "r2"), top=5)).read()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a&amp;b" in text


def test_shapley_values_sum_to_centred_preactivation():
    torch.manual_seed(0)
    net = MetaWeightNet()
    with torch.no_grad():
        net.v.copy_(torch.tensor([0.7, -1.2, 0.3, -0.9, 0.5, 0.1]))
    s = np.random.default_rng(0).normal(size=(50, 6)) * np.array([3, 2, 0.5, 0.4, 1, 1])
    net.update_stats(torch.as_tensor(s, dtype=torch.float32))
    phi = shapley_values(net, s)
    pre = net.preactivation(net.normalize_features(torch.as_tensor(s, dtype=torch.float32))).detach().double().numpy()
    np.testing.assert_allclose(phi.sum(1), pre - pre.mean(), rtol=1e-5, atol=1e-5)


def test_subset_table_by_hand():
    """6 pairs: two stable correct (w 1.0, 0.8), one volatile correct (w 0.2), two persistent
    incorrect (w 0.1, 0.3), one in no subset. FocalPO gamma = 1: its weight is p."""
    p = np.array([0.9, 0.85, 0.95, 0.1, 0.2, 0.5])
    sigma = np.array([0.05, 0.0, 0.5, 0.9, 0.0, 0.2])
    w = np.array([1.0, 0.8, 0.2, 0.1, 0.3, 5.0])
    t = subset_table(p, sigma, w, 1.0)
    assert [(c, round(a, 6), round(b, 6)) for _, c, a, b in t] == [(2, 0.9, 0.875), (1, 0.2, 0.95), (2, 0.2, 0.15)]


def test_run_without_meta_says_so_and_missing_files_are_named(tmp_path, run_dir, capsys):
    import shutil

    d = str(tmp_path / "nometa")
    shutil.copytree(run_dir, d)
    rows = open(os.path.join(d, "pair_weights.csv")).read().splitlines()
    hdr = rows[0].split(",")
    wi = hdr.index("weight")
    fixed = [rows[0]] + [",".join("1" if i == wi else x for i, x in enumerate(r.split(","))) for r in rows[1:]]
    open(os.path.join(d, "pair_weights.csv"), "w").write("\n".join(fixed) + "\n")
    path = build_report(d)
    assert "all weights are 1" in open(os.path.join(os.path.dirname(path), "summary.md")).read()
    os.remove(os.path.join(d, "metrics.jsonl"))
    assert main([d]) == 2
    assert "metrics.jsonl is missing" in capsys.readouterr().err


def test_meta_net_rebuilt_with_the_runs_momentum(run_dir, tmp_path):
    """The feature scale's bias correction depends on meta.stats_momentum: the loaded net must use the run's."""
    from metapo_fast.report import load_meta_net

    a = load_meta_net(run_dir, {"stats_momentum": 0.5})
    b = load_meta_net(run_dir, {"stats_momentum": 0.99})
    assert a.stats_momentum == 0.5 and b.stats_momentum == 0.99
    assert not torch.allclose(a.scale(), b.scale())


def test_report_without_matplotlib_names_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    """matplotlib is the report extra's (pyproject): without it the report says which extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main([run_dir, "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'metapo-fast[report]'" in err and "Traceback" not in err


def test_page_order_verdict_and_suspects(run_dir):
    """The page answers "which pairs are mislabelled" first: verdict (weights vs the margin yardstick),
    the share of suspects with its rule, the suspect table, then the plots; numbers are formatted."""
    import json

    from metapo_fast.report import load_run, suspects

    text = open(build_report(run_dir, out=os.path.join(run_dir, "r_order"), top=20)).read()
    heads = [text.index(h) for h in ("<h2>Verdict</h2>", "<h2>Suspect pairs</h2>", "<h2>Run summary</h2>", "<h2>Plots</h2>")]
    assert heads == sorted(heads)
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    assert f"AUROC {s['weights_auroc_clean_vs_flipped']:.3f} for the weights, {s['margin_auroc_clean_vs_flipped']:.3f} for the margin" in text
    run = load_run(run_dir)
    flag, rule = suspects(run)
    assert np.array_equal(flag, (run["p"] < 0.5) & (run["w"] < np.median(run["w"])))
    assert f"<b>{int(flag.sum())} of {len(flag)} pairs" in text and "precision" in text and "recall" in text
    assert "<pre>" not in text and "0.5328841277890467" not in text  # no raw markdown, no 16-digit floats
    for v in json.load(open(os.path.join(run_dir, "summary.json"))).values():
        if isinstance(v, float) and len(repr(v)) > 8:
            assert repr(v) not in text


def test_subsets_that_do_not_fit_the_run_are_dropped_with_a_sentence(run_dir):
    from metapo_fast.report import load_run

    run = load_run(run_dir)
    md = open(os.path.join(os.path.dirname(build_report(run_dir, out=os.path.join(run_dir, "r_sub"))), "summary.md")).read()
    table9 = subset_table(run["p"], run["sigma"], run["w"], 1.0)
    for name, count, _, _ in table9:
        if count == 0:
            assert f"| {name} |" not in md and name in md.split("paper Table 9")[1].split("## ")[0]
        else:
            assert f"| {name} | {count} |" in md
    assert "| nan" not in md


def test_export_and_drop_suspects_round_trip(run_dir, tmp_path, capsys):
    """--export-suspects writes the flagged rows in the input format; --drop-suspects the others."""
    import json

    from metapo_fast.report import load_run, source_rows, suspects

    run = load_run(run_dir)
    flag, _ = suspects(run)
    rows, why = source_rows(run)
    assert why is None
    exp, kept = tmp_path / "suspects.jsonl", tmp_path / "clean.jsonl"
    assert main([run_dir, "--out", str(tmp_path / "rep"), "--export-suspects", str(exp), "--drop-suspects", str(kept)]) == 0
    got = [json.loads(l) for l in exp.read_text().splitlines()]
    rest = [json.loads(l) for l in kept.read_text().splitlines()]
    flagged = sorted({int(r) for r in run["source_row"][flag]})
    assert len(got) == len(flagged) > 0 and len(got) + len(rest) == len(rows)
    assert got == [json.loads(json.dumps(dict(rows[i]))) for i in flagged]
    assert {"prompt", "chosen", "rejected"} <= set(got[0])
    out = capsys.readouterr().out
    assert f"exported {len(got)} rows" in out and f"kept {len(rest)} rows" in out


def test_report_renders_in_a_headless_browser(run_dir, tmp_path):
    """Chromium opens the page: the verdict is there, the suspect table has its rows, every image
    decodes (tools/report_browser_check.py). Skipped where no Chromium is installed."""
    from tools.report_browser_check import check, find_chromium, problems

    if find_chromium() is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set $CHROMIUM)")
    page = build_report(run_dir, out=str(tmp_path / "rep"), top=7)
    res = check(page, screenshot=str(tmp_path / "shot.png"))
    assert problems(res) == [], res
    assert res["h2"][:5] == ["Verdict", "Suspect pairs", "Run summary", "Learned coefficients", "Plots"] and res["tables"][0] == 7
    assert res["images"] == 5 and (tmp_path / "shot.png").read_bytes()[:8] == PNG_MAGIC
    os.remove(tmp_path / "rep" / "curves.png")  # a missing image is caught
    assert "images that did not load: ['curves.png']" in problems(check(page))
