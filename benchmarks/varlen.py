"""Padded SDPA vs padding-free packed varlen attention: decoder forward + backward time.

    python -m benchmarks.varlen [--device cpu|cuda] [--reps 7]

A Llama-style decoder (random weights) runs the hidden states of 2B sequences with lengths drawn
uniformly from [min_len, max_len] (fresh lengths and tokens every repetition, the same for both
paths), then backward of a loss on the real tokens. The two paths alternate inside one process;
medians are reported. Writes benchmarks/results/varlen_<device>.{md,csv}.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import add_output_args, output_path, provenance, write_csv, write_md
from metapo_fast.models.hf import last_hidden_states
from metapo_fast.models.varlen import register


def _model(hidden: int, layers: int, heads: int, kv_heads: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(dtype).to(device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(device: str, reps: int, n_seqs: int, min_len: int, max_len: int, hidden: int, layers: int, dtype) -> list[dict]:
    padded = _model(hidden, layers, max(1, hidden // 64), max(1, hidden // 256), dtype, device)
    packed = copy.deepcopy(padded)
    packed.config._attn_implementation = register()
    gen = torch.Generator().manual_seed(1)
    times = {"sdpa (padded)": [], "varlen (packed)": []}
    real = padded_tokens = 0
    for rep in range(reps + 1):  # the first repetition warms up and is dropped
        lengths = torch.randint(min_len, max_len + 1, (n_seqs,), generator=gen)
        t = int(lengths.max())
        mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = torch.randint(0, 1024, (n_seqs, t), generator=gen)
        order = [("sdpa (padded)", padded), ("varlen (packed)", packed)]
        for name, m in (order if rep % 2 == 0 else order[::-1]):
            m.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            h = last_hidden_states(m, ids.to(device), mask if name.startswith("varlen") else mask.to(device))
            (h.float().square() * mask.to(device).unsqueeze(-1)).mean().backward()
            _sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
        if rep:
            real += int(lengths.sum())
            padded_tokens += n_seqs * t
    base = statistics.median(times["sdpa (padded)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"path": name, "median_s": round(med, 4), "min_s": round(min(ts), 4), "max_s": round(max(ts), 4),
                     "time_vs_padded": round(med / base, 3), "real_tokens_per_s": round(real / reps / med, 1),
                     "padding_share": round(1 - real / padded_tokens, 3)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seqs", type=int, default=16, help="2B sequences per batch")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="2 repeats of 4 sequences up to 64 tokens, hidden 64 (a smoke test)")
    add_output_args(ap, "varlen_<device>")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.seqs, a.min_len, a.max_len, a.hidden, a.layers = 2, 4, 8, 64, 64, 2
    out = output_path(a, f"varlen_{a.device}")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    rows = run(a.device, a.reps, a.seqs, a.min_len, a.max_len, a.hidden, a.layers, dtype)
    prov = provenance(a.device, "benchmarks.varlen")
    setup = (f"{a.seqs} sequences per batch, lengths uniform in [{a.min_len}, {a.max_len}], Llama decoder hidden {a.hidden}, "
             f"{a.layers} layers, {dtype}, forward + backward, median of {a.reps} fresh batches (paths alternate)")
    write_csv(out + ".csv", rows)
    notes = ("The CUDA kernels (flash-attn varlen / torch varlen_attn, bf16): not measured, no GPU was available. "
             "Run `python -m benchmarks.varlen --device cuda` on one.") if a.device == "cpu" else ""
    write_md(out + ".md", "Padded SDPA vs packed varlen attention", prov, setup, rows, notes)
    print(open(out + ".md").read())
    print(f"wrote {out}.md and .csv")


if __name__ == "__main__":
    main()
