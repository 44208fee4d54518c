"""Counters of the fused loss at LLM scale, on CPU: GEMM FLOPs, aten ops per chunk, host syncs and
peak transient memory, for the fused op and for the trainer's forward + backward (one micro-step
of ``PairForward``, DPO and MetaPO).

    python -m benchmarks.counters                 # real V=128256; Llama-3-8B's T (256 .. 16k) and rows per chunk / 4
    python -m benchmarks.counters --quick --json  # the same / 16, T_llama 1k .. 16k: a few minutes on 2 cores

Nothing here is timed: every number is a count, so it is the same on any machine, and on the GPU
for the CUDA row path (``row``: every row through the GEMMs, as on CUDA; forced on CPU by
:func:`metapo_fast.ops.chunking.force_row_rule`) as long as the same code runs.

Shapes: the LM head of Llama-3-8B is H=4096, V=128256, bf16, with the default ``chunk_bytes``
(256 MiB for policy + reference logits) = 523 rows per chunk. Here V is the real one, H is small
(the FLOP ratios do not depend on H) and the budget keeps the same number of rows per chunk in
fp32 (``chunk_bytes * 4/2``), so every chunking decision is Llama-3-8B's. T and the rows per chunk
are both divided by ``--scale`` (4; ``--quick`` 16): the same decisions with far less work
(``T_llama`` in each row is the Llama-scale T it stands for).

How each number is taken (one ``TorchDispatchMode`` over the measured call, the custom op's
Python body run under it too):

Row rules: ``cpu`` drops prompt and padding rows on the device (CPU); ``cuda`` runs the CUDA code
path (no device-side compaction), given the host's copy of the labels as the trainer gives it;
``bare`` is the CUDA path without that copy (every row through the GEMMs).

* ``flops_per_n_loss_hv``: 2mnk of every mm/addmm/bmm/matmul with V among its dimensions (the LM
  head's GEMMs; the decoder's are left out), over ``N_loss * H * V`` with ``N_loss`` the number of
  tokens that carry a label. 8.0 is the floor (policy, reference, grad_h, grad_W).
* ``aten_ops_per_chunk``: every aten op dispatched in the measured call (forward and backward of the
  LM-head part) over the number of logits chunks (calls of the forward epilogue). The C++ epilogue is
  one op per call, like one Triton launch.
  On the CUDA row rules each host-built tensor the schedule copies to the device counts as one op
  too (``h2d_copies``; on this CPU run the copy is a no-op).
* ``aten_ops_by_origin``: the same ops by who dispatched them (:func:`_origin`: the fused loss,
  the transformers decoder's forward, autograd's engine, other); ``aten_ops_per_chunk_head``: the
  fused loss's own (and its copies) per chunk, which for a trainer-step row is the LM head's share
  of a step whose decoder forward and backward are counted too.
* ``host_syncs``: ops that read device data on the host: ``_local_scalar_dense`` (``.item()``,
  ``int()``, ``.tolist()``), ``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``,
  ``repeat_interleave`` without an output size. Those inside the CPU-only input checks (which run
  only for CPU tensors) and the CPU row compaction are counted apart (``host_syncs_cpu_only``).
  Syncs inside transformers' decoder (its SDPA mask check) are counted apart too
  (``host_syncs_decoder``): they are not the LM head's.
* ``peak_transient_mb``: the peak of the bytes held by tensors created during the call, less what
  is still held at its end (the gradients), so it is the temporaries: one chunk's logits and so on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import weakref
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metapo_fast.ops import preference_loss as _pl
from metapo_fast.ops.chunking import force_row_rule

LLAMA3_8B = dict(H=4096, V=128256, itemsize=2)
DEFAULT_BUDGET = 256 * 1024 * 1024
_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.matmul.default,
          _aten.mm.out, _aten.addmm.out, _aten.addmm_.default, _aten.linear.default}
_SYNCS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
          _aten.is_nonzero.default, _aten.equal.default, _aten.repeat_interleave.Tensor}
_CPU_ONLY_FRAMES = {"_check_inputs", "_check", "rows_of",  # guarded by device == cpu / compact;
                    "check_label_values"}  # rows_of: the host-side rows of the ghost pass


ORIGINS = ("head", "decoder", "autograd", "other")
_SEP = os.sep


def _origin(f) -> str:
    """Who dispatched an op, from the innermost Python frame outside torch itself: the LM-head ops
    (``head``: ``metapo_fast/ops``, ``losses.py``, the ghost pass), the transformers decoder's forward
    (``decoder``), autograd's engine running a backward with no frame of ours in between
    (``autograd``: the decoder's backward and the gradients' accumulation; the fused loss's
    backward is Python, so ``head``), or anything else (``other``: the trainer's forward around them,
    the benchmark)."""
    while f is not None:
        name = f.f_code.co_filename
        if _SEP + "torch" + _SEP in name:
            if _SEP + "torch" + _SEP + "autograd" + _SEP in name:
                return "autograd"
        elif _SEP + "transformers" + _SEP in name:
            return "decoder"
        elif (_SEP + "metapo_fast" + _SEP + "ops" + _SEP in name or name.endswith(_SEP + "losses.py")
              or name.endswith(_SEP + "ghost.py")):
            return "head"
        else:
            return "other"
        f = f.f_back
    return "other"


def _custom_bodies() -> dict:
    """Custom ops whose Python body must run under the counter (else it is one opaque op)."""
    return {torch.ops.metapo_fast.fused_linear_preference_loss.default: _pl._fused_op._init_fn}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Counters(TorchDispatchMode):
    """Counts FLOPs of the GEMMs with ``vocab`` among their dimensions, ops, host syncs and live
    tensor bytes while active."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.head_flops = 0
        self.ops = 0
        self.syncs: list[str] = []
        self.cpu_only_syncs: list[str] = []
        self.decoder_syncs: list[str] = []
        self.by_origin = dict.fromkeys(ORIGINS, 0)
        self._live: dict[int, list] = {}
        self.cur = self.peak = 0
        self._bodies = _custom_bodies()

    # memory: bytes of storages created under the mode, released when their last tensor dies
    def _track(self, out, in_ptrs: set) -> None:
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            p, n = st.data_ptr(), st.nbytes()
            if n == 0 or (p in in_ptrs and p not in self._live):
                continue  # a view of / in-place on a tensor from outside
            if p in self._live:
                self._live[p][1] += 1
            else:
                self._live[p] = [n, 1]
                self.cur += n
                self.peak = max(self.peak, self.cur)
            weakref.finalize(t, self._drop, p)

    def _drop(self, p: int) -> None:
        rec = self._live.get(p)
        if rec is None:
            return
        rec[1] -= 1
        if rec[1] == 0:
            self.cur -= rec[0]
            del self._live[p]

    def _gemm_flops(self, func, args, out) -> int:
        if func not in _GEMMS:
            return 0
        a, b = (args[1], args[2]) if func in (_aten.addmm.default, _aten.addmm.out, _aten.addmm_.default,
                                              _aten.baddbmm.default) else (args[0], args[1])
        if func is _aten.linear.default:  # x (.., k) @ weight (n, k)^T
            b = b.t()
        batch = 1
        if a.dim() > 2:
            batch = int(torch.tensor(a.shape[:-2]).prod())
        m, k, n = a.shape[-2] if a.dim() > 1 else 1, a.shape[-1], b.shape[-1] if b.dim() > 1 else 1
        if self.vocab not in (m, k, n):
            return 0
        return 2 * batch * m * k * n

    def _is_sync(self, func, args) -> bool:
        if func in _SYNCS or "unique" in func.__name__:
            return func is not _aten.repeat_interleave.Tensor or args[-1:] == ()
        if func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default):
            return any(i is not None and i.dtype == torch.bool for i in args[1])
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = self._bodies.get(func)
        if body is not None:  # the fused op: count what its body dispatches
            with self:
                return body(*args, **kwargs)
        self.ops += 1
        self.by_origin[_origin(sys._getframe(1))] += 1
        if self._is_sync(func, args):
            frames, files, f = set(), set(), sys._getframe(1)
            while f is not None:
                frames.add(f.f_code.co_name)
                files.add(f.f_code.co_filename)
                f = f.f_back
            if frames & _CPU_ONLY_FRAMES:
                self.cpu_only_syncs.append(str(func))
            elif any(os.sep + "transformers" + os.sep in x for x in files):
                self.decoder_syncs.append(str(func))
            else:
                self.syncs.append(str(func))
        in_ptrs = {_ptr(t) for t in _tensors((args, kwargs)) if t.device.type != "meta"}
        out = func(*args, **kwargs)
        self.head_flops += self._gemm_flops(func, args, out)
        self._track(out, in_ptrs)
        return out


@contextlib.contextmanager
def _count_chunks():
    """Count the forward-epilogue calls (one per logits chunk) of the fused op."""
    from metapo_fast.metapo import ghost

    n = [0]
    sites = [(_pl, "lce_epilogue_forward_into"), (ghost, "lce_epilogue_forward")]
    origs = [getattr(m, name) for m, name in sites]

    def wrap(orig):
        def counted(*a, **k):
            n[0] += 1
            return orig(*a, **k)
        return counted

    for (m, name), o in zip(sites, origs):
        setattr(m, name, wrap(o))
    try:
        yield n
    finally:
        for (m, name), o in zip(sites, origs):
            setattr(m, name, o)


@contextlib.contextmanager
def _count_host_copies():
    """On the CUDA row rules, count the host-built tensors the schedule moves to the device (row
    indices, row-to-sequence matrices, loss constants: every ``to_device`` call is one, as the
    schedule calls it only for what it built on the host): on a GPU each is one queued copy, on
    this CPU run a no-op that no dispatch counter would see."""
    from metapo_fast.ops import chunking

    cuda_rule = not chunking.compact_rows(torch.device("cpu"))
    orig, n = chunking.ChunkSchedule.to_device, [0]

    def to_device(self, x):
        if cuda_rule and x.device.type == "cpu":
            n[0] += 1
        return orig(self, x)

    chunking.ChunkSchedule.to_device = to_device
    try:
        yield n
    finally:
        chunking.ChunkSchedule.to_device = orig


def measure(fn: Callable[[], None], vocab: int, n_loss: int, hidden: int) -> dict:
    """Run ``fn`` under the counters; return the row's numbers."""
    import gc

    gc.collect()
    mode = Counters(vocab)
    t0 = time.perf_counter()
    with _count_chunks() as chunks, _count_host_copies() as copies, mode:
        fn()
    gc.collect()
    ops = mode.ops + copies[0]
    return dict(
        flops_per_n_loss_hv=round(mode.head_flops / (n_loss * hidden * vocab), 4),
        aten_ops=ops, chunks=chunks[0], aten_ops_per_chunk=round(ops / max(chunks[0], 1), 1), h2d_copies=copies[0],
        aten_ops_by_origin=dict(mode.by_origin),
        aten_ops_per_chunk_head=round((mode.by_origin["head"] + copies[0]) / max(chunks[0], 1), 1),
        host_syncs=len(mode.syncs), host_syncs_cpu_only=len(mode.cpu_only_syncs), host_syncs_decoder=len(mode.decoder_syncs),
        sync_ops=sorted(set(mode.syncs)),
        peak_transient_mb=round((mode.peak - mode.cur) / 2**20, 1), wall_s=round(time.perf_counter() - t0, 1),
    )


# ------------------------------------------------------------------------------------------ data
def make_batch(b: int, t: int, h: int, v: int, seed: int = 0):
    """Chat-like pairs: a prompt of ~30% of T, responses of 35-65% of T, right padding; fp32."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g) * 0.5
    weight = torch.randn(v, h, generator=g) * (1 / h**0.5)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    for r in range(2 * b):
        p = int(0.3 * t)
        end = p + int((0.35 + 0.3 * torch.rand((), generator=g).item()) * t)
        labels[r, :p] = -100
        labels[r, end:] = -100
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g)
    ref_weight = weight + 0.01 * torch.randn(weight.shape, generator=g)
    return hidden, weight, labels, ref_hidden, ref_weight


def _metapo_weights(stats) -> torch.Tensor:
    """A stand-in for the meta-network: a per-pair function of the margin (raw weights)."""
    return torch.sigmoid(-stats.margins).detach() * 2


# ------------------------------------------------------------------------------------------ rows
def op_row(path: str, t: int, b: int, h: int, v: int, chunk_bytes: int, backend: str, host_labels: bool = False) -> dict:
    """The fused op alone (forward + backward): ``dpo`` = sigmoid loss with reference hidden
    states; ``metapo`` = the trainer's MetaPO sequence of fused-op calls (see :func:`step_row`)."""
    hidden, weight, labels, rh, rw = make_batch(b, t, h, v)
    hidden.requires_grad_()
    weight.requires_grad_()
    n_loss = int((labels != -100).sum())
    kw = dict(chunk_bytes=chunk_bytes, backend=backend)
    if host_labels:  # the trainer's call on CUDA: the collated labels' host copy
        kw["host_labels"] = labels.clone()

    def run():
        if path == "dpo":
            out = _pl.fused_linear_preference_loss(hidden, weight, labels, ref_hidden=rh, ref_weight=rw, **kw)
        else:
            out = _metapo_op_call(hidden, weight, labels, rh, rw, kw)
        out.loss.backward()

    return {**measure(run, v, n_loss, h), "n_loss": n_loss, "rows": 2 * b * t}


def _metapo_op_call(hidden, weight, labels, rh, rw, kw):
    """What ``PairForward`` does for MetaPO, on the op (no model): the single pass with a per-chunk
    weights callback where the op has one, else the no-grad pass then the gradient pass."""
    import inspect

    if "weights_fn" in inspect.signature(_pl.fused_linear_preference_loss).parameters:
        return _pl.fused_linear_preference_loss(hidden, weight, labels, ref_hidden=rh, ref_weight=rw,
                                                weights_fn=lambda pairs, st: _metapo_weights(st), **kw)
    with torch.no_grad():
        stats = _pl.fused_linear_preference_loss(hidden.detach(), weight, labels, ref_hidden=rh, ref_weight=rw, **kw)
    w = _metapo_weights(stats)
    return _pl.fused_linear_preference_loss(hidden, weight, labels, ref_logps=(stats.ref_chosen_logps, stats.ref_rejected_logps),
                                            sample_weights=w, compute_kl=False, **kw)


def step_row(path: str, t: int, b: int, h: int, v: int, chunk_bytes: int, backend: str) -> dict:
    """The trainer's forward (``PairForward``: a 1-layer Llama-config policy and reference with the
    real V) and the backward of its loss, DPO or MetaPO (``weights_fn``: a per-pair function of
    the margin standing in for the meta-network). Only the LM head's GEMMs are counted as FLOPs;
    ops, syncs and memory include the decoder's (small at this H)."""
    import inspect

    from transformers import LlamaConfig, LlamaForCausalLM

    from metapo_fast.losses import LossParams
    from metapo_fast.train.forward import PairForward
    from metapo_fast.train.parallel import PlainEngine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=max(t, 64), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ref.requires_grad_(False)
    _, _, labels, _, _ = make_batch(b, t, h, v)
    ids = torch.randint(0, v, labels.shape, generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    for r in range(2 * b):  # padding where the labels end
        last = int((labels[r] != -100).nonzero().max()) + 1
        attn[r, last + 1:] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    fwd = PairForward(policy, ref, PlainEngine(policy, None, None, None), torch.device("cpu"), "sigmoid", LossParams(),
                      chunk_bytes, backend)
    n_loss = int((labels != -100).sum())

    def run():
        with contextlib.ExitStack() as stack:
            if path == "metapo" and "chunk_weights_fn" in inspect.signature(fwd.__call__).parameters:
                out, _, _ = fwd(batch, stack=stack, chunk_weights_fn=lambda pairs, st: _metapo_weights(st))
            else:
                out, _, _ = fwd(batch, _metapo_weights if path == "metapo" else None, stack=stack)
            out.loss.backward()

    return {**measure(run, v, n_loss, h), "n_loss": n_loss, "rows": 2 * b * t}


def ghost_row(t: int, b: int, h: int, v: int, chunk_bytes: int, backend: str, host_labels: bool = False) -> dict:
    """The meta-update's LM-head ghost pass (``head_ghost_dots``) on the same batch and budget
    (``host_labels``: given the labels' host copy, as ``pair_gradient_dots`` passes it)."""
    from metapo_fast.metapo.ghost import head_ghost_dots
    from metapo_fast.ops.chunking import ChunkSchedule

    hidden, weight, labels, _, _ = make_batch(b, t, h, v)
    coef, gw = torch.randn(2 * b), torch.randn_like(weight)
    rows = ChunkSchedule.rows_for(chunk_bytes, v, 4, True)
    n_loss = int((labels != -100).sum())

    def run():
        head_ghost_dots(hidden, weight, None, labels, coef, gw, None, b, rows_per_chunk=rows, backend=backend,
                        host_labels=labels.clone() if host_labels else None)

    return {**measure(run, v, n_loss, h), "n_loss": n_loss, "rows": 2 * b * t}


# ------------------------------------------------------------------------------------------ main
def plan(quick: bool, tiny: bool = False, scale: Optional[int] = None):
    """(T list, H, V, chunk_bytes in fp32, scale): Llama-3-8B's T = 256, 1k, 4k, 8k, 16k and its 523
    rows per chunk, both divided by ``scale`` (same chunking decisions, ``scale**2`` less work)."""
    v, h = 128256, 16
    rows = DEFAULT_BUDGET // (LLAMA3_8B["V"] * LLAMA3_8B["itemsize"] * 2)  # 523 rows of bf16 policy + ref logits
    ts = [256, 1024, 4096, 8192, 16384]
    if tiny:  # tests: V=2003
        v, h, scale = 2003, 8, 16
    scale = scale or (16 if quick else 4)
    if quick:  # T=256 (single pass, like T=1k and up after the fixes) left out
        ts = ts[1:]
    return [t // scale for t in ts], h, v, (rows // scale) * v * 4 * 2, scale


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        return "?"


def collect(quick: bool = False, tiny: bool = False, backend: str = "auto", steps: bool = True,
            only_t: Optional[list] = None, emit: Callable[[dict], None] = lambda row: None,
            scale: Optional[int] = None) -> list[dict]:
    """Every row (op, trainer step, ghost pass; CPU row rule and CUDA row rule) at every T."""
    ts, h, v, chunk_bytes, scale = plan(quick, tiny, scale)
    head = dict(commit=_commit(), device="cpu", H=h, V=v, chunk_rows=chunk_bytes // (v * 4 * 2))
    results = []
    for t in (only_t or ts):
        b = 2 if t * scale <= 4096 else 1  # pairs per micro-batch: 2 up to T=4k, then 1
        jobs = []
        jobs.append(("op", "dpo", "bare", False, lambda: op_row("dpo", t, b, h, v, chunk_bytes, backend)))
        for rule, compact in (("cpu", True), ("cuda", False)):
            for path in ("dpo", "metapo"):
                jobs.append(("op", path, rule, compact,
                             lambda p=path, c=compact: op_row(p, t, b, h, v, chunk_bytes, backend, host_labels=not c)))
            if steps and not (quick and t != (only_t or ts)[0]):  # --quick: trainer-step rows at the first T only
                for path in ("dpo", "metapo"):
                    jobs.append(("step", path, rule, compact, lambda p=path: step_row(p, t, b, h, v, chunk_bytes, backend)))
            if not (quick and compact):  # --quick: the ghost pass on the CUDA rule only
                jobs.append(("ghost", "ghost", rule, compact,
                             lambda c=compact: ghost_row(t, b, h, v, chunk_bytes, backend, host_labels=not c)))
        if not quick or t == (only_t or ts)[0]:  # the ghost pass on the CUDA rule without the host's labels
            jobs.append(("ghost", "ghost", "bare", False, lambda: ghost_row(t, b, h, v, chunk_bytes, backend)))
        for what, path, rule, compact, fn in jobs:
            with force_row_rule(compact):
                r = fn()
            row = {**head, "what": what, "path": path, "row_rule": rule, "T": t, "T_llama": t * scale,
                   "pairs": b, **r}
            results.append(row)
            emit(row)
    return results


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="T and the chunk rows / 16 (same chunking decisions)")
    ap.add_argument("--tiny", action="store_true", help="V=2003, T 16..256 (tests)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-step", action="store_true", help="skip the trainer-step rows")
    ap.add_argument("--T", type=int, nargs="*", help="only these T")
    ap.add_argument("--scale", type=int, help="divide Llama-3-8B's T and rows per chunk by this (default 4; --quick 16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ts, h, v, chunk_bytes, scale = plan(args.quick, args.tiny, args.scale)
    if not args.json:
        print(f"# benchmarks.counters  commit {_commit()}  CPU, fp32, H={h}, V={v}, {chunk_bytes // (v * 8)} rows per chunk "
              f"(Llama-3-8B bf16 with the default budget: 523, / {scale}); T_llama = T x {scale}, the Llama-scale T a row stands for")
        print(f"{'what':<6} {'path':<7} {'rows':<4} {'T':>6} {'T_llama':>7} {'N_loss':>7} {'FLOPs/NlossHV':>13} {'chunks':>6} "
              f"{'ops/chunk':>9} {'syncs':>5} {'cpu-only':>8} {'decoder':>7} {'peak MB':>8} {'s':>6}")

    def emit(row):
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['what']:<6} {row['path']:<7} {row['row_rule']:<4} {row['T']:>6} {row['T_llama']:>7} {row['n_loss']:>7} "
                  f"{row['flops_per_n_loss_hv']:>13.3f} {row['chunks']:>6} {row['aten_ops_per_chunk']:>9.1f} "
                  f"{row['host_syncs']:>5} {row['host_syncs_cpu_only']:>8} {row['host_syncs_decoder']:>7} "
                  f"{row['peak_transient_mb']:>8.1f} {row['wall_s']:>6.1f}", flush=True)

    collect(args.quick, args.tiny, args.backend, not args.no_step, args.T, emit, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
