"""Shared helpers for benchmarks: provenance (device, commit, date, command) and result files."""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(RESULTS))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=os.path.dirname(RESULTS)).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def provenance(device: str, module: str) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m", module] + sys.argv[1:]),
    }


def mean_std(xs) -> str:
    """``"mean +- std"`` (population std) of the finite values of ``xs``; the value alone for one, n/a for none."""
    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} +- {statistics.pstdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def write_csv(name: str, rows: list[dict]) -> str:
    path = name if os.path.isabs(name) else os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def write_md(name: str, title: str, prov: dict, setup: str, rows: list[dict], notes: str = "") -> str:
    """A results file: title, provenance line, setup, the rows as a table, optional notes."""
    path = name if os.path.isabs(name) else os.path.join(RESULTS, name)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = [f"# {title}", "", f"device: {prov['device']}; torch {prov['torch']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; {setup}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
