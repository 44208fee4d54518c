"""The prepared GPU run (benchmarks/gpu): its dry run on CPU in this environment and on the lent
image's stack (torch 2.11, triton 3.6), and the runner's time boxes, failures and packing."""
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from benchmarks.gpu import run as gpu_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["env", "tests", "fused_loss", "tracker", "meta", "e2e"]


def _summary_rows(path):
    rows = [l.split("|")[1:-1] for l in open(path).read().splitlines() if l.startswith("| ") and not l.startswith("| step")]
    return {r[0].strip(): (r[1].strip(), [f.strip() for f in r[3].split(",") if f.strip()]) for r in rows}


@pytest.mark.slow
def test_dry_run_passes_here_and_writes_every_file(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), "--dry-run", "--results-dir", str(res),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _summary_rows(res / "gpu_run_dryrun.md")
    assert list(rows) == STEPS
    for step, (status, files) in rows.items():
        assert status.startswith("ok"), (step, status)
        assert files and all((res / f).stat().st_size > 0 for f in files), (step, files)
    assert "metapo_fast: imported" in (res / "env_dryrun.md").read_text()
    # every benchmark row was measured (tiny, on CPU): no "failed" or "not measured" cell
    for name in ("fused_loss_dryrun.csv", "tracker_dryrun.csv", "meta_overhead_dryrun.csv", "e2e_dryrun.csv"):
        text = (res / name).read_text()
        assert "failed" not in text and "not measured" not in text, name
    fused = (res / "fused_loss_dryrun.md").read_text()
    assert all(f"| time | {impl}" in fused for impl in ("ours", "liger", "naive", "gemm")) and "| memory | ours" in fused
    e2e = (res / "e2e_dryrun.md").read_text()
    assert "TRL DPOTrainer" in e2e and "dpo, varlen" in e2e and "metapo, K=2, sdpa" in e2e
    # what the device tool returns: at most 8 files, the results in one tarball
    assert sorted(os.listdir(out)) == ["gpu_results.tar.gz", "gpu_run.log", "gpu_run.md"]
    names = tarfile.open(out / "gpu_results.tar.gz").getnames()
    assert {f for _, files in rows.values() for f in files} <= set(names)


def _index_has_torch_2_11() -> bool:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return "2.11.0" in proc.stdout


@pytest.mark.slow
def test_dry_run_passes_on_the_lent_images_stack():
    """compat_check.sh: a venv with torch 2.11 (the CUDA 13 build the image holds), triton 3.6,
    transformers 5.17 and the carried packages, then the dry run in it."""
    if not _index_has_torch_2_11():
        pytest.skip("no package index with torch 2.11.0 is reachable: the torch 2.11 stack cannot be built here")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "compat_check.sh")], capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "the dry run passed on the torch 2.11 stack (6 steps ok)" in proc.stdout
    assert "torch 2.11." in proc.stdout and "triton 3.6." in proc.stdout


def _fake_plan(tmp, sleepy_box=1):
    py = sys.executable
    write = lambda name: [py, "-c", f"open({str(tmp / name)!r}, 'w').write('x')"]  # noqa: E731
    return [("env", 30, write("env_gpu.md")),
            ("tests", sleepy_box, [py, "-c", "import time; time.sleep(60)"]),
            ("fused_loss", 30, [py, "-c", "import sys; sys.exit(3)"]),
            ("tracker", 30, write("tracker_gpu.md"))]


def test_runner_boxes_failures_and_packs_after_every_step(tmp_path, monkeypatch):
    res, out = tmp_path / "res", tmp_path / "out"
    res.mkdir()
    monkeypatch.setattr(gpu_run, "steps", lambda dry, r, suffix: _fake_plan(res))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a "GPU run" without touching a GPU
    t0 = time.monotonic()
    rc = gpu_run.main(["--results-dir", str(res), "--out", str(out)])
    assert time.monotonic() - t0 < 30  # the sleeping step was killed at its 1 s box
    assert rc == 1
    rows = _summary_rows(res / "gpu_run.md")
    assert rows["env"][0] == "ok" and rows["tracker"][0] == "ok"
    assert rows["tests"][0].startswith("timed out after 1 s")
    assert rows["fused_loss"][0] == "failed (exit 3)"
    assert rows["tracker"][1] == ["tracker_gpu.md"]
    assert sorted(os.listdir(out)) == ["gpu_results.tar.gz", "gpu_run.log", "gpu_run.md"]
    assert {"env_gpu.md", "tracker_gpu.md", "gpu_run.md"} <= set(tarfile.open(out / "gpu_results.tar.gz").getnames())


def test_runner_stops_starting_steps_when_the_budget_is_spent(tmp_path, monkeypatch):
    res = tmp_path / "res"
    res.mkdir()
    monkeypatch.setattr(gpu_run, "steps", lambda dry, r, suffix: _fake_plan(res, sleepy_box=30))
    monkeypatch.setattr(gpu_run, "MIN_STEP_S", 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_run.main(["--results-dir", str(res), "--budget", "3", "--out", ""]) == 1
    rows = _summary_rows(res / "gpu_run.md")
    assert rows["tests"][0].startswith("timed out")  # boxed to what was left of the budget
    assert rows["tracker"][0] == "not run: the budget is spent"


def test_runner_refuses_a_gpu_run_without_a_gpu_and_unknown_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_run.main(["--results-dir", str(tmp_path)]) == 2
    assert "use --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_run.main(["--dry-run", "--results-dir", str(tmp_path), "--only", "fused_loss,warp_drive"])
    assert "unknown step(s) ['warp_drive']" in capsys.readouterr().err


def test_junit_summary_counts_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a" time="1.5"/>'
                   '<testcase classname="t" name="b" time="0.1"><failure message="boom|bad">tb</failure></testcase>'
                   '<testcase classname="t" name="c" time="0"><skipped message="no gpu"/></testcase></testsuite></testsuites>')
    line = gpu_run._junit_summary(str(xml), str(tmp_path / "p.md"), "GPU tests")
    assert line == "1 passed, 1 failed, 1 skipped"
    md = (tmp_path / "p.md").read_text()
    assert "| t::b | failed | 0.10 | boom/bad |" in md


def test_fused_loss_rows_get_8nhv_tflops_and_gemm_ratio():
    from benchmarks.fused_loss import _ratios, floor_flops

    shape = {"B": 4, "T": 1024, "H": 4096, "V": 128256}
    rows = [{**shape, "impl": "ours", "median_s": 0.2, "peak_extra_mb": 500.0},
            {**shape, "impl": "gemm", "median_s": 0.1, "peak_extra_mb": 4000.0},
            {**shape, "impl": "naive", "median_s": 0.4, "peak_extra_mb": 10000.0},
            {**shape, "impl": "liger", "median_s": "OOM"}]
    _ratios(rows)
    assert floor_flops(4, 1024, 4096, 128256) == 8 * 8192 * 4096 * 128256
    assert rows[0]["tflops_8nhv"] == round(8 * 8192 * 4096 * 128256 / 0.2 / 1e12, 2)
    assert rows[0]["time_vs_gemm"] == 2.0 and rows[0]["time_vs_naive"] == 0.5 and rows[0]["mem_vs_naive"] == 0.05
    assert "tflops_8nhv" not in rows[3]


def test_fused_loss_worker_reports_out_of_memory_as_a_result(monkeypatch, capsys):
    from benchmarks import fused_loss

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 62.00 GiB")

    monkeypatch.setattr(fused_loss, "worker", oom)
    fused_loss.main(["--set", "dryrun", "--worker", "naive", "--shape", "2,32,32,96"])
    out = capsys.readouterr().out
    assert 'RESULT {"impl": "naive", "median_s": "OOM", "error": "CUDA out of memory. Tried to allocate 62.00 GiB"}' in out


def test_boxed_step_repacks_while_it_runs(tmp_path):
    ticks = []
    with open(tmp_path / "log", "w") as log:
        status, secs = gpu_run._run_boxed([sys.executable, "-c", "import time; time.sleep(2.2)"], 30, log, dict(os.environ),
                                          on_tick=lambda: ticks.append(time.monotonic()), tick=0.5)
    assert status == "ok" and 2.0 < secs < 10 and len(ticks) >= 3


def test_budget_counts_from_run_sh_start(tmp_path, monkeypatch):
    """run.sh exports GPU_RUN_T0: the wheel install and imports before run.py spend the same budget."""
    res = tmp_path / "res"
    res.mkdir()
    monkeypatch.setattr(gpu_run, "steps", lambda dry, r, suffix: _fake_plan(res))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("GPU_RUN_T0", str(time.time() - 100))
    assert gpu_run.main(["--results-dir", str(res), "--budget", "105", "--out", ""]) == 1
    assert all(status == "not run: the budget is spent" for status, _ in _summary_rows(res / "gpu_run.md").values())
