"""Shared helpers for benchmarks: provenance (device, commit, date, command) and result files."""
from __future__ import annotations

import csv
import datetime as _dt
import json
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
    """Short commit (+uncommitted). Where there is no git checkout (the lent GPU machine receives the
    working tree only), ``.whl/COMMIT``, written by benchmarks/gpu/fetch_wheels.sh, names it."""
    stamp = os.path.join(os.path.dirname(os.path.dirname(RESULTS)), ".whl", "COMMIT")
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(RESULTS))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=os.path.dirname(RESULTS)).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        if os.path.exists(stamp):
            return open(stamp).read().strip() + " (from .whl/COMMIT)"
        return "uncommitted"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def provenance(device: str, module: str) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
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


def add_output_args(ap, stem: str) -> None:
    """``--record`` / ``--out-dir`` / ``--name``: where a benchmark's .md and .csv go (see :func:`output_path`)."""
    ap.add_argument("--record", action="store_true",
                    help=f"write the committed results ({stem}.md/.csv); without it a new timestamped file "
                         f"({stem}-<UTC time>) is written, so a trial run never overwrites them")
    ap.add_argument("--out-dir", default=RESULTS, help="directory of the results (default: benchmarks/results)")
    ap.add_argument("--name", default=None, help="file name stem (overrides the default and --record)")


def output_path(args, stem: str) -> str:
    """``<out-dir>/<stem>`` with ``--record``, ``<out-dir>/<stem>-<UTC time>`` without it, ``<out-dir>/<name>``
    when ``--name`` is given; the caller adds ``.md`` / ``.csv``."""
    if args.name:
        stem = args.name
    elif not args.record:
        stem = f"{stem}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}"
    os.makedirs(args.out_dir, exist_ok=True)
    return os.path.join(os.path.abspath(args.out_dir), stem)


def md_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (the union of their keys, or ``keys``), for stdout and result files."""
    if keys is None:
        keys = []
        for r in rows:
            keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(stem: str, lines: list[str]) -> None:
    """Write ``<stem>.md`` (a benchmark's own Markdown lines) and print it."""
    text = "\n".join(lines)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)


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
    lines = [f"# {title}", "", f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton']}; commit {prov['commit']}; {prov['date']}",
             f"command: `{prov['command']}`; {setup}", "", md_table(rows)]
    if notes:
        lines += ["", notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def random_text_rows(n: int, prompt_max: int, response_max: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of random lowercase text (one token per character with the character tokenizer):
    prompts of ``prompt_max/4`` to ``prompt_max`` characters, responses of ``response_max/4`` to
    ``response_max``; lengths vary per row, as real data's do."""
    import random

    rng = random.Random(seed)
    text = lambda lo, hi: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"prompt": text(max(1, prompt_max // 4), prompt_max), "chosen": text(max(1, response_max // 4), response_max),
             "rejected": text(max(1, response_max // 4), response_max)} for _ in range(n)]


def add_model_args(ap, *, hidden: int | None, layers: int, heads: int, kv_heads: int, vocab: int, batch: int, pairs: int = 400) -> None:
    """The random-Llama and batch arguments of :func:`random_llama_task`."""
    ap.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=None, metavar="PROMPT,RESPONSE",
                    help="random-text pairs up to these many characters (tokens) instead of the short synthetic task")
    ap.add_argument("--hidden", type=int, default=hidden, help="width of the random Llama" + (
        "" if hidden else " (default: the embedded tiny model and task instead)"))
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--batch", type=int, default=batch, help="pairs per optimiser step")
    ap.add_argument("--pairs", type=int, default=pairs, help="synthetic preference pairs written for the run")


def random_llama_task(tmp: str, a) -> tuple[str, str, float, int]:
    """A Llama with random weights (``a.hidden``, ``a.layers``, ``a.heads``, ``a.kv_heads``, ``a.vocab``)
    and the character tokenizer saved under ``tmp/model``, and ``a.pairs`` synthetic preference pairs
    in ``tmp/pairs.jsonl``. Returns (model dir, data file, mean real tokens of ``a.batch`` pairs, parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from metapo_fast.data.synthetic import build_char_tokenizer, make_synthetic_task

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = os.path.join(tmp, "model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    if getattr(a, "lengths", None):  # random text of realistic lengths: throughput, not learning
        rows = random_text_rows(a.pairs, *a.lengths)
    else:
        rows = make_synthetic_task(a.pairs, 0.3, 0.0, 0, 0).train_rows
    data = os.path.join(tmp, "pairs.jsonl")
    toks = []
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
            p = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
            toks.append(2 * p + len(tok(r["chosen"], add_special_tokens=False)["input_ids"])
                        + len(tok(r["rejected"], add_special_tokens=False)["input_ids"]))
    return model_dir, data, statistics.mean(toks) * a.batch, n_params



def ours_overrides(model_dir: str, data: str, a, out: str, *, meta: bool, attn: str, device: str) -> list[str]:
    """Config overrides for our trainer on :func:`random_llama_task`'s model and data (no SFT warm-up,
    constant learning rate ``a.lr``, no evaluation or checkpoints, bf16 on CUDA)."""
    return [f"model.name_or_path={model_dir}", f"data.path={data}", "train.sft_warmup_steps=0", "data.val_fraction=0.05",
            "data.val_split=random", f"train.per_device_batch_size={a.batch}", f"train.max_steps={a.steps}", "train.eval_every=0",
            "train.save_every=0", f"train.lr={a.lr}", "train.lr_scheduler=constant", "train.warmup_ratio=0",
            "train.weight_decay=0", "loss.loss_type=sigmoid", "loss.beta=0.1", f"meta.enabled={str(meta).lower()}",
            f"meta.interval={a.meta_interval}", "meta.start_fraction=0",  # every K-th step: the overhead per K
            f"meta.val_batch_size={a.batch}", f"train.output_dir={out}",
            f"model.dtype={'bfloat16' if device == 'cuda' else 'float32'}", f"model.attn_implementation={attn}",
            "data.max_length=512", "data.max_prompt_length=256", f"train.device={device}",
            "train.sync_step_timing=true"]  # TRL's clock synchronises after its optimiser step too
