"""The prepared GPU run: every GPU claim of the project measured in one call of under 9 minutes.

    bash benchmarks/gpu/run.sh              # on the lent GPU machine (installs .whl/ first)
    bash benchmarks/gpu/run.sh --dry-run    # the same steps with tiny shapes on CPU (a test, not a measurement)
    python -m benchmarks.gpu.run --only fused_loss,tracker

Steps, in order, each in its own process group under its own time box, each writing its result
files before the next starts (a later failure loses nothing):

    env          device, driver, versions of torch/triton/transformers/deepspeed/liger/trl, commit
    tests        ``pytest -m gpu`` (all GPU-marked tests, the host-sync count among them)
    fused_loss   ours vs Liger vs naive vs the bare GEMMs, bf16, Llama-3-8B head, T=1024/4096,
                 and the memory row at T=8192 with reference and KL
    tracker      the tracker update at N=10M pairs, B=64 and B=4096
    meta         meta-update overhead at K=100 on a ~0.6B model
    e2e          step time, tokens/s and MFU vs TRL DPOTrainer on the same ~0.6B model, sdpa and varlen

Results go to ``benchmarks/results/*_gpu.{md,csv}`` (``--results-dir`` elsewhere; a dry run
writes ``*_dryrun.*`` to a temporary directory unless told). ``gpu_run.md`` says how each step
ended and how long it took. When ``$OUT`` is set (the device tool returns only what is written
there, at most 8 files) or ``--out`` is given, after every step the results are packed into
``$OUT/gpu_results.tar.gz`` next to ``gpu_run.md`` and ``gpu_run.log``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The 0.6B configuration (Llama blocks, random weights) and pairs of random text of 60-240 tokens per
# prompt and per response (up to 480 per sequence), shared by meta and e2e.
MODEL_06B = ["--hidden", "1536", "--layers", "16", "--heads", "12", "--kv-heads", "4", "--vocab", "32000", "--lengths", "240,240"]
MIN_STEP_S = 10.0  # a step is not started with less than this left of the budget
MODEL_TINY = ["--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "2", "--vocab", "512"]


def steps(dry: bool, res: str, suffix: str) -> list[tuple[str, int, list[str]]]:
    """(name, time box in seconds, command) of each step; ``res`` is the results directory."""
    py = sys.executable
    model = MODEL_TINY if dry else MODEL_06B
    junit = os.path.join(res, f"pytest_{suffix}.xml")
    return [
        ("env", 60, [py, "-m", "benchmarks.gpu.run", "--env-report", os.path.join(res, f"env_{suffix}.md")]),
        ("tests", 150, [py, "-m", "pytest", "-m", "gpu", "tests", "-v", "-p", "no:cacheprovider", "--timeout", "60",
                        f"--junitxml={junit}", "-o", "junit_family=xunit1"]),
        ("fused_loss", 210, [py, "-m", "benchmarks.fused_loss", "--set", "dryrun" if dry else "gpu", "--repeats", "2" if dry else "5",
                             "--out-dir", res, "--name", f"fused_loss_{suffix}"]),
        ("tracker", 40, [py, "-m", "benchmarks.tracker", "--device", "cpu" if dry else "cuda", "--sizes", "10000" if dry else "10000000",
                         "--batches", "64,4096", "--repeats", "5" if dry else "100", "--out-dir", res, "--name", f"tracker_{suffix}"]),
        ("meta", 70, [py, "-m", "benchmarks.meta_overhead", *model, "--batch", "2" if dry else "8", "--steps", "3" if dry else "10",
                      "--meta-updates", "2" if dry else "5", "--out-dir", res, "--name", f"meta_overhead_{suffix}"]),
        ("e2e", 170, [py, "-m", "benchmarks.e2e", "--device", "cpu" if dry else "cuda", *model, "--batch", "2" if dry else "8",
                      "--pairs", "40" if dry else "400", "--steps", "3" if dry else "20", "--warmup", "1" if dry else "4",
                      "--meta-interval", "2" if dry else "10", "--attn", "sdpa,varlen", "--out-dir", res, "--name", f"e2e_{suffix}"]),
    ]


def _env_report(path: str) -> None:
    """Device and versions, with an import check of every module a step needs."""
    import importlib

    lines = ["# Environment of the prepared GPU run", "", f"date: {_now()}", f"commit: {_commit()}", f"python: {sys.version.split()[0]}"]
    try:
        import torch

        lines.append(f"torch: {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            lines.append(f"device: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    except ImportError as e:
        lines.append(f"torch: cannot import ({e})")
    for mod in ("triton", "transformers", "accelerate", "datasets", "deepspeed", "liger_kernel", "trl", "flash_attn", "numpy",
                "pyarrow", "huggingface_hub", "pytest"):
        try:
            m = importlib.import_module(mod)
            lines.append(f"{mod}: {getattr(m, '__version__', 'imported (no __version__)')} ({os.path.dirname(m.__file__ or '')})")
        except Exception as e:  # a missing optional module is a finding to report, not a failure of this step
            lines.append(f"{mod}: not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi: not available ({e})")
    importlib.import_module("metapo_fast")  # the package itself must import on this stack

    lines.append("metapo_fast: imported")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _junit_summary(xml_path: str, md_path: str, title: str) -> str:
    """A Markdown table of the GPU tests from pytest's JUnit XML; returns the one-line count."""
    if not os.path.exists(xml_path):  # pytest writes it at the end of the session: killed before, nothing
        with open(md_path, "w") as f:
            f.write(f"# {title}\n\n{_now()}; commit {_commit()}: no JUnit XML was written (pytest did not finish); "
                    "the per-test lines are in gpu_run.log\n")
        return "no JUnit XML written"
    root = ET.parse(xml_path).getroot()
    rows, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                break
        counts[outcome] += 1
        rows.append(f"| {case.get('classname', '')}::{case.get('name', '')} | {outcome} | {float(case.get('time', 0)):.2f} | {msg.replace('|', '/')} |")
    line = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
    with open(md_path, "w") as f:
        f.write("\n".join([f"# {title}", "", f"{_now()}; commit {_commit()}; command: `pytest -m gpu tests`", "", line, "",
                           "| test | outcome | seconds | message |", "|---|---|---|---|", *rows]) + "\n")
    return line


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _commit() -> str:
    sys.path.insert(0, ROOT)
    from benchmarks.common import git_commit

    return git_commit()


def _run_boxed(cmd: list[str], box: float, log, env: dict, on_tick=None, tick: float = 15.0) -> tuple[str, float]:
    """Run ``cmd`` in its own process group; kill the group when the box is over. ``on_tick`` runs
    every ``tick`` seconds while it runs (the results are repacked: a kill from outside loses little)."""
    t0 = time.monotonic()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    while True:
        left = box - (time.monotonic() - t0)
        try:
            rc = proc.wait(timeout=max(0.01, min(tick, left)))
            return ("ok" if rc == 0 else f"failed (exit {rc})"), time.monotonic() - t0
        except subprocess.TimeoutExpired:
            if time.monotonic() - t0 >= box:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"timed out after {box:.0f} s", time.monotonic() - t0
            if on_tick is not None:
                log.flush()
                on_tick()


def _pack(res: str, out: str | None, summary: str, log_path: str) -> None:
    """Copy the results into ``out``: one tarball of the result files, the summary and the log."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".gpu_results.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(res)):
            if name.endswith((".md", ".csv", ".xml")):
                tar.add(os.path.join(res, name), arcname=name)
    os.replace(tmp, os.path.join(out, "gpu_results.tar.gz"))
    shutil.copyfile(summary, os.path.join(out, "gpu_run.md"))
    shutil.copyfile(log_path, os.path.join(out, "gpu_run.log"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks that every step starts and writes its files")
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results (a temporary directory for --dry-run)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also copy the results here (default: $OUT)")
    ap.add_argument("--only", default=None, help="comma-separated subset of steps")
    ap.add_argument("--budget", type=float, default=520.0,
                    help="seconds for everything from run.sh's start ($GPU_RUN_T0) to the last step's end (the device call's limit is 540)")
    ap.add_argument("--env-report", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.env_report:
        _env_report(a.env_report)
        return 0
    suffix = "dryrun" if a.dry_run else "gpu"
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu run: no CUDA device here; use --dry-run on CPU", file=sys.stderr)
            return 2
    res = os.path.abspath(a.results_dir or (tempfile.mkdtemp(prefix="gpu_dryrun_") if a.dry_run else os.path.join(ROOT, "benchmarks", "results")))
    os.makedirs(res, exist_ok=True)
    plan = steps(a.dry_run, res, suffix)
    if a.only:
        wanted = a.only.split(",")
        unknown = sorted(set(wanted) - {n for n, _, _ in plan})
        if unknown:
            ap.error(f"--only: unknown step(s) {unknown}; the steps are {[n for n, _, _ in plan]}")
        plan = [s for s in plan if s[0] in wanted]
    summary = os.path.join(res, "gpu_run.md" if suffix == "gpu" else f"gpu_run_{suffix}.md")
    log_path = os.path.join(res, "gpu_run.log" if suffix == "gpu" else f"gpu_run_{suffix}.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if a.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # the budget counts from run.sh's start (wheel install, the editable install, imports) when it says so
    t_start = time.monotonic() - max(0.0, time.time() - float(os.environ.get("GPU_RUN_T0", time.time())))
    rows = []
    with open(log_path, "w") as log:
        for name, box, cmd in plan:
            left = a.budget - (time.monotonic() - t_start)
            if left < MIN_STEP_S:
                rows.append((name, "not run: the budget is spent", 0.0, ""))
            else:
                status, secs = _run_boxed(cmd, min(box, left), log, env,
                                          on_tick=lambda: _pack(res, a.out, summary, log_path) if os.path.exists(summary) else None)
                files = sorted(f for f in os.listdir(res) if f.startswith(_prefix(name)) and f"_{suffix}" in f)
                if name == "tests":
                    status += "; " + _junit_summary(os.path.join(res, f"pytest_{suffix}.xml"), os.path.join(res, f"pytest_{suffix}.md"),
                                                    "GPU-marked tests (pytest -m gpu)")
                    files = sorted(set(files) | {f"pytest_{suffix}.md"})
                rows.append((name, status, secs, ", ".join(files)))
            log.flush()
            _write_summary(summary, rows, a, suffix, time.monotonic() - t_start)
            _pack(res, a.out, summary, log_path)
            print(f"gpu run: {name}: {rows[-1][1]} ({rows[-1][2]:.0f} s)", flush=True)
    print(f"gpu run: results in {res}" + (f", copied to {a.out}" if a.out else ""))
    print(open(summary).read())
    return 0 if all(r[1].startswith("ok") for r in rows) else 1


def _prefix(step: str) -> str:
    return {"env": "env_", "tests": "pytest_", "fused_loss": "fused_loss_", "tracker": "tracker_", "meta": "meta_overhead_",
            "e2e": "e2e_"}[step]


def _write_summary(path, rows, a, suffix, total) -> None:
    kind = "dry run on CPU (tiny shapes: a test, not a measurement)" if a.dry_run else "GPU run"
    lines = [f"# Prepared GPU run: {kind}", "", f"{_now()}; commit {_commit()}; budget {a.budget:.0f} s; took {total:.0f} s", "",
             "| step | status | seconds | files |", "|---|---|---|---|"]
    lines += [f"| {n} | {s} | {t:.1f} | {f} |" for n, s, t, f in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
