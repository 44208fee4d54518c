"""Temporal tracker update time and memory (paper: 40 bytes per pair; ours: 24).

    python -m benchmarks.tracker [--repeats 200] [--device all|cpu|cuda] [--sizes N,..] [--batches B,..]

By default B = 64 pairs per update with N = 161k (HH-RLHF) and N = 10M pairs; fresh random ids and
margins every repeat; median time per update. CPU backends (C++, vectorised torch) are measured here; the
Triton kernel is timed only on a GPU (otherwise the table says "not measured").
Writes benchmarks/results/tracker-<UTC time>.{csv,md} (``--record``: tracker.*, the committed
files; ``--out-dir``, ``--name``); ``--quick`` runs N = 10k only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from metapo_fast.metapo.tracker import TemporalTracker

from .common import add_output_args, output_path, provenance, write_csv


def bench(n: int, b: int, backend: str, device: str, repeats: int) -> float:
    tr = TemporalTracker(n, device=device, backend=backend)
    g = torch.Generator().manual_seed(0)
    times = []
    for r in range(repeats + 5):
        ids = torch.randint(0, n, (b,), generator=g).to(device)
        m, k = torch.randn(b, generator=g).to(device), torch.rand(b, generator=g).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.update(ids, m, k)
        if device == "cuda":
            torch.cuda.synchronize()
        if r >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"],
                    help="all: the CPU backends, and the CUDA ones when a GPU is present")
    ap.add_argument("--sizes", default="161000,10000000", help="comma-separated numbers of pairs N")
    ap.add_argument("--batches", default="64", help="comma-separated pairs per update B")
    ap.add_argument("--quick", action="store_true", help="N = 10000, 5 repeats (seconds; a smoke test)")
    add_output_args(ap, "tracker")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "10000", min(args.repeats, 5)
    out = output_path(args, "tracker")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    rows = []
    prov = provenance("cuda" if args.device == "cuda" else "cpu", "benchmarks.tracker")
    cases = []
    if args.device in ("all", "cpu"):
        cases += [("cpu", "cpp"), ("cpu", "torch")]
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        cases += [("cuda", "triton"), ("cuda", "torch")]
    for n in (int(x) for x in args.sizes.split(",")):
        for b in (int(x) for x in args.batches.split(",")):
            for device, backend in cases:
                t = bench(n, b, backend, device, args.repeats)
                rows.append({"device_kind": device, "backend": backend, "N": n, "B": b, "median_us": round(t * 1e6, 2),
                             "bytes_per_pair": 24, "paper_bytes_per_pair": 40, "state_mb": round(24 * n / 2 ** 20, 2),
                             "paper_state_mb": round(40 * n / 2 ** 20, 2), **prov})
                print(rows[-1]["backend"], n, b, rows[-1]["median_us"], "us")
            if args.device == "all" and not torch.cuda.is_available():
                rows.append({"device_kind": "cuda", "backend": "triton", "N": n, "B": b, "median_us": "not measured (no GPU)",
                             "bytes_per_pair": 24, "paper_bytes_per_pair": 40, "state_mb": round(24 * n / 2 ** 20, 2),
                             "paper_state_mb": round(40 * n / 2 ** 20, 2), **prov})
    write_csv(out + ".csv", rows)
    lines = ["# Temporal tracker benchmark", "", f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; median of {args.repeats} updates, fresh random ids each", "",
             "| backend | N pairs | B | median per update (us) | state (MB), ours 24 B/pair | paper 40 B/pair (MB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} ({r['device_kind']}) | {r['N']:,} | {r['B']} | {r['median_us']} | {r['state_mb']} | {r['paper_state_mb']} |" for r in rows]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.md and .csv")


if __name__ == "__main__":
    main()
