"""Fused linear preference loss vs naive PyTorch vs Liger-Kernel: forward+backward time and peak
memory, measured side by side in one run.

    python -m benchmarks.fused_loss                 # CPU set: B=4 pairs, T=256, H=512, V=32000, fp32
    python -m benchmarks.fused_loss --set gpu       # Llama-3-8B head, T=1024 and 4096, bf16 (needs CUDA),
                                                    # plus the memory row at T=8192
    python -m benchmarks.fused_loss --set dryrun    # the gpu set's steps, tiny shapes on CPU (a test)

Each (implementation, shape) runs in a fresh process so its peak memory is its own: on CPU the
process's peak RSS (ru_maxrss) above the RSS after the inputs were built; on GPU
torch.cuda.max_memory_allocated above the inputs. Times are medians over repeats with fresh random
inputs drawn per repeat (never zeros), after one warm-up. ``ours`` gets the host's copy of the
labels as the trainer passes it (prompt rows, a quarter of each sequence, skip the GEMMs on CUDA);
``ours_metapo`` adds per-pair weights from the pass's own margins through the per-chunk callback
(MetaPO's single pass); ``gemm`` is the four bare GEMMs over every row. Results: a table on stdout and
benchmarks/results/fused_loss_<set>-<UTC time>.csv / .md (``--record``: fused_loss_<set>, the
committed file; ``--out-dir``, ``--name``) with device, dtype, shape, commit, date and command,
rewritten after every shape. ``--quick``: the dryrun set (seconds). A worker that runs out of memory gives an
"OOM" row; one that fails gives a "failed" row, and the run exits 1 after the others have run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from .common import RESULTS, add_output_args, output_path, provenance, write_csv

SETS = {
    "cpu": {"device": "cpu", "dtype": "float32", "shapes": [(4, 256, 512, 32000)], "impls": ["naive", "ours", "liger"]},
    "gpu": {"device": "cuda", "dtype": "bfloat16", "shapes": [(4, 1024, 4096, 128256), (4, 4096, 4096, 128256)],
            "impls": ["ours", "ours_metapo", "gemm", "liger", "naive"],
            # the memory-scaling row: T = 8192, with the reference and the token KL (naive may not fit: then "OOM")
            "memory_shapes": [(4, 8192, 4096, 128256)], "memory_impls": ["ours", "liger", "naive"]},
    # the gpu set's steps with tiny shapes on CPU: a test of the plumbing (benchmarks/gpu/run.py --dry-run)
    "dryrun": {"device": "cpu", "dtype": "float32", "shapes": [(2, 16, 32, 96)],
               "impls": ["ours", "ours_metapo", "gemm", "liger", "naive"], "memory_shapes": [(2, 32, 32, 96)],
               "memory_impls": ["ours"]},
}


def floor_flops(b: int, t: int, h: int, v: int) -> int:
    """The 8NHV floor, N = 2BT rows: policy logits, reference logits, and the two gradient GEMMs."""
    return 8 * (2 * b * t) * h * v


def _inputs(b, t, h, v, dtype, device, seed):
    # drawn on the device itself: the gpu set's inputs are ~2.4 GB of bf16 per repeat, minutes on a host generator
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    hidden = mk(2 * b, t, h).requires_grad_()
    weight = (mk(v, h, scale=h ** -0.5)).requires_grad_()
    ref_hidden, ref_weight = mk(2 * b, t, h), mk(v, h, scale=h ** -0.5)
    labels = torch.randint(0, v, (2 * b, t), generator=g, device=device)
    labels[:, : t // 4] = -100  # a prompt of a quarter of the sequence
    # the host's copy of the labels, as the trainer has it (the collated batch before its copy to the
    # device): the fused loss then drops prompt rows before the GEMMs on CUDA too; made before timing
    return hidden, weight, labels, ref_hidden, ref_weight, labels.cpu()


def _step(impl, x, backend):
    hidden, weight, labels, ref_hidden, ref_weight, host_labels = x
    if impl in ("ours", "ours_metapo"):
        from metapo_fast import fused_linear_preference_loss

        # ours_metapo: per-pair weights from this pass's margins, chunk by chunk (MetaPO's single pass)
        wfn = (lambda pairs, stats: torch.sigmoid(stats.margins.float())) if impl == "ours_metapo" else None  # noqa: E731
        loss = fused_linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                            beta=0.1, backend=backend, host_labels=host_labels, weights_fn=wfn).loss
    elif impl == "naive":
        from metapo_fast.losses import PairBatch, pair_loss
        from tests.naive import sequence_logps

        s = sequence_logps(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, compute_kl=True)
        b = hidden.shape[0] // 2
        loss = pair_loss(PairBatch(s.logps[:b], s.logps[b:], s.counts[:b], s.counts[b:], s.ref_logps[:b], s.ref_logps[b:]))[0]
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=hidden.is_cuda, use_ref_model=True)
        res = fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
        loss = res[0] if isinstance(res, tuple) else res
    elif impl == "gemm":  # the four GEMMs of the 8NHV floor, run bare (every row: the Liger comparison's terms)
        n, h = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
        hf, rf = hidden.detach().reshape(n, h), ref_hidden.reshape(n, h)
        logits = hf @ weight.detach().t()
        _ = rf @ ref_weight.t()  # reference logits: timed, then dropped
        _ = logits @ weight.detach()
        _ = logits.t() @ hf
        return
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    loss.backward()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def worker(impl, shape, dtype, device, repeats, backend) -> dict:
    b, t, h, v = shape
    dt = getattr(torch, dtype)
    times, peak = [], 0
    for rep in range(repeats + 1):  # repeat 0 is the warm-up
        x = _inputs(b, t, h, v, dt, device, seed=rep)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_now()
        t0 = time.perf_counter()
        _step(impl, x, backend)
        _sync(device)
        dt_s = time.perf_counter() - t0
        if rep and device == "cuda":  # the timed repeats only: the warm-up holds compile / autotune buffers
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        elif device != "cuda":  # ru_maxrss is a high-water mark over the process
            peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
        if rep:
            times.append(dt_s)
        del x
    return {"impl": impl, "median_s": statistics.median(times), "min_s": min(times), "peak_extra_mb": peak / 2 ** 20,
            "repeats": repeats}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="epilogue backend for ours (auto, cpp, torch, triton)")
    ap.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    ap.add_argument("--quick", action="store_true", help="the dryrun set's tiny shapes, 2 repeats (seconds; a smoke test)")
    add_output_args(ap, "fused_loss_<set>")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.set, args.repeats = "dryrun", min(args.repeats, 2)
    cfg = SETS[args.set]
    if args.worker:
        try:
            res = worker(args.worker, tuple(int(x) for x in args.shape.split(",")), cfg["dtype"], cfg["device"], args.repeats, args.backend)
        except torch.OutOfMemoryError as e:  # a result of the memory row, not a failure of the benchmark
            res = {"impl": args.worker, "median_s": "OOM", "error": str(e).splitlines()[0][:200]}
        print("RESULT " + json.dumps(res))
        return
    prov = provenance(cfg["device"], "benchmarks.fused_loss")
    out = output_path(args, f"fused_loss_{args.set}")
    rows = []
    impls = args.impls.split(",") if args.impls else cfg["impls"]
    plan = [(shape, impls, "") for shape in cfg["shapes"]]
    plan += [(shape, cfg["memory_impls"], "memory") for shape in cfg.get("memory_shapes", []) if not args.impls]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        for shape, shape_impls, kind in plan:
            for impl in shape_impls:
                rows.append({"set": args.set, "row": kind, "impl": impl, "B": shape[0], "T": shape[1], "H": shape[2], "V": shape[3],
                             "dtype": cfg["dtype"], "median_s": "not measured", "note": "no GPU in this session", **prov})
    else:
        for shape, shape_impls, kind in plan:
            shape_rows = []
            for impl in shape_impls:
                cmd = [sys.executable, "-m", "benchmarks.fused_loss", "--set", args.set, "--repeats", str(args.repeats),
                       "--backend", args.backend, "--worker", impl, "--shape", ",".join(map(str, shape))]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(RESULTS)))
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:  # recorded, and the other implementations still run
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                    print(f"benchmark worker {impl} {shape} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}", file=sys.stderr)
                    r = {"impl": impl, "median_s": "failed", "error": tail}
                else:
                    r = json.loads(line[0][7:])
                shape_rows.append({"set": args.set, "row": kind, "B": shape[0], "T": shape[1], "H": shape[2], "V": shape[3],
                                   "dtype": cfg["dtype"], "backend": args.backend if impl.startswith("ours") else "", **r, **prov})
                _write(out, args.set, rows + shape_rows, prov)  # after every worker: a hang later loses nothing
            _ratios(shape_rows)
            rows += shape_rows
    _write(out, args.set, rows, prov)
    print(open(out + ".md").read())
    print(f"wrote {out}.md and .csv")
    if any(r["median_s"] == "failed" for r in rows):
        sys.exit(1)


def _ratios(shape_rows: list[dict]) -> None:
    """time and memory vs naive, time vs the bare GEMMs, and TFLOP/s on the 8NHV floor."""
    ok = {r["impl"]: r for r in shape_rows if isinstance(r["median_s"], float)}
    for r in shape_rows:
        if not isinstance(r["median_s"], float):
            continue
        r["tflops_8nhv"] = round(floor_flops(r["B"], r["T"], r["H"], r["V"]) / r["median_s"] / 1e12, 2)
        if "naive" in ok:
            r["time_vs_naive"] = round(r["median_s"] / ok["naive"]["median_s"], 3)
            r["mem_vs_naive"] = round(r["peak_extra_mb"] / ok["naive"]["peak_extra_mb"], 3) if ok["naive"]["peak_extra_mb"] > 0 else ""
        if "gemm" in ok:
            r["time_vs_gemm"] = round(r["median_s"] / ok["gemm"]["median_s"], 3)


def _write(out: str, set_name: str, rows: list[dict], prov: dict) -> None:
    write_csv(out + ".csv", rows)
    _write_md(out + ".md", set_name, rows, prov)


def _write_md(path, set_name, rows, prov):
    lines = [f"# Fused loss benchmark ({set_name} set)", "",
             f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`", "",
             *(["No GPU was available when this file was written: nothing below was measured.", ""]
               if any(r["median_s"] == "not measured" for r in rows) else []),
             "TFLOP/s counts the 8NHV floor (N = 2BT rows): policy and reference logits and the two gradient GEMMs. "
             "gemm is those four GEMMs run bare. Every implementation uses the reference; ours and naive also compute the "
             "full-vocabulary token KL, Liger does not. The memory rows are the longest sequence (T = 8192 in the gpu set). "
             "ours gets the host's copy of the labels (the trainer's case), so on CUDA its GEMMs skip the prompt rows (a "
             "quarter of each sequence) that gemm, Liger and naive compute; ours_metapo adds per-pair weights from the "
             "pass's own margins (MetaPO's single pass). A pair whose rows do not fit the chunk budget or the device's free "
             "memory is streamed (still 8NHV, plus two V x H fp32 accumulators).", "",
             "| row | impl | B | T | H | V | dtype | median fwd+bwd (s) | peak extra memory (MiB) | TFLOP/s (8NHV) | time vs gemm | time vs naive | memory vs naive |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["median_s"] if isinstance(r["median_s"], str) else f"{r['median_s']:.4f}"
        if r.get("error"):
            ms += f" ({r['error']})"
        mem = f"{r['peak_extra_mb']:.0f}" if "peak_extra_mb" in r else "not measured"
        lines.append(f"| {r.get('row') or 'time'} | {r['impl']}{' (' + r['backend'] + ')' if r.get('backend') else ''} | {r['B']} | {r['T']} | "
                     f"{r['H']} | {r['V']} | {r['dtype']} | {ms} | {mem} | {r.get('tflops_8nhv', '')} | {r.get('time_vs_gemm', '')} | "
                     f"{r.get('time_vs_naive', '')} | {r.get('mem_vs_naive', '')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
