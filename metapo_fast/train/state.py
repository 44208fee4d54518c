"""Crash-safe checkpoints and exact resume.

A checkpoint is either complete and verified, or it does not exist.

Layout: ``RUN_DIR/checkpoints/step_00000123/`` with whatever the trainer writes (model in Hugging
Face layout, optimizer / ZeRO state, tracker, meta-network, RNG, data position) and a
``manifest.json`` holding the SHA-256 and size of every file. Writing protocol:

1. all ranks write into ``step_00000123.tmp`` (a ``.tmp`` directory is never loaded);
2. every file is fsync'ed; rank 0 writes the manifest last (temporary name, fsync, rename);
3. rank 0 renames the directory to its final name and fsyncs the parent directory.

A kill -9 at any point leaves either the previous checkpoints untouched plus a ``.tmp`` directory
(removed by the next save), or a complete new checkpoint. On load, checkpoints are verified newest
first; one whose manifest is missing or whose files do not match it is reported by path and
reason, and the previous good one is used.

What a checkpoint holds (:func:`save_checkpoint`): the model in Hugging Face layout and the
tokenizer (``model/``), the engine's state (optimizer and scheduler, or DeepSpeed's partitions),
``trainer_state.pt`` (tracker, last-visit margins, meta-network and its optimiser, sampler
position, counters, validation cursor, RNG of python / numpy / torch / CUDA, config fingerprint),
``config.yaml`` and ``pair_weights.csv``. :func:`restore` puts every one of them back, so a
resumed run continues exactly where the saved one was.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from ..files import atomic_write_text, fsync_dir, sha256_file

__all__ = ["CheckpointManager", "CheckpointError", "find_resume", "load_hf_weights", "save_checkpoint", "restore",
           "load_trainer_state"]

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


class CheckpointManager:
    """Save, verify, rotate and find checkpoints under ``run_dir/checkpoints``.

    Args:
        run_dir: the run directory.
        keep: number of complete checkpoints kept (older ones are deleted after a new save).
        rank, world_size: this process's place; every rank calls :meth:`save` (each writes its
            own files), rank 0 owns the manifest, renames and rotation.
        barrier: called between the phases when ``world_size > 1`` (e.g. ``torch.distributed.barrier``).
    """

    def __init__(self, run_dir: str, keep: int = 2, rank: int = 0, world_size: int = 1,
                 barrier: Optional[Callable[[], None]] = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if world_size > 1 and barrier is None:
            raise ValueError("CheckpointManager: a barrier is required when world_size > 1")
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self._barrier = barrier or (lambda: None)
        os.makedirs(self.root, exist_ok=True)

    def path_for(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def steps(self) -> list[int]:
        """Steps of the complete-looking (renamed) checkpoints, oldest first."""
        found = []
        for name in os.listdir(self.root):
            m = _STEP_RE.match(name)
            if m and os.path.isdir(os.path.join(self.root, name)):
                found.append(int(m.group(1)))
        return sorted(found)

    def save(self, step: int, writer: Callable[[str], None], meta: Optional[dict] = None) -> str:
        """Run ``writer(tmp_dir)`` on every rank, then commit the checkpoint atomically. Returns its path."""
        final = self.path_for(step)
        tmp = final + ".tmp"
        if self.rank == 0:
            for name in os.listdir(self.root):  # leftovers of a crashed save
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        writer(tmp)
        for rel in _files(tmp):  # each rank fsyncs what exists (its own files included)
            try:
                with open(os.path.join(tmp, rel), "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:  # another rank's atomic write renamed its temporary file meanwhile:
                pass  # that rank fsyncs the file under its final name
        self._barrier()
        if self.rank == 0:
            files = {rel: {"sha256": sha256_file(os.path.join(tmp, rel)), "bytes": os.path.getsize(os.path.join(tmp, rel))}
                     for rel in _files(tmp)}
            manifest = {"step": step, "files": files, "meta": meta or {}, "complete": True}
            atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
            for d, _, _ in os.walk(tmp):
                fsync_dir(d)
            if os.path.exists(final):  # re-saving the same step (e.g. after resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._rotate()
        self._barrier()
        return final

    def _rotate(self) -> None:
        steps = self.steps()
        for s in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(self.path_for(s), ignore_errors=True)

    @staticmethod
    def verify(path: str, deep: bool = True) -> tuple[bool, str]:
        """(ok, reason). ``deep`` re-hashes every file; otherwise sizes only."""
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            return False, "manifest.json is missing (the save did not finish)"
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            return False, f"manifest.json is unreadable: {exc}"
        if not manifest.get("complete"):
            return False, "manifest.json is not marked complete"
        for rel, info in manifest.get("files", {}).items():
            fp = os.path.join(path, rel)
            if not os.path.isfile(fp):
                return False, f"{rel} is missing"
            if os.path.getsize(fp) != info["bytes"]:
                return False, f"{rel} has {os.path.getsize(fp)} bytes, manifest says {info['bytes']}"
            if deep and sha256_file(fp) != info["sha256"]:
                return False, f"{rel} does not match its SHA-256 in manifest.json (corrupted)"
        return True, "ok"

    def latest_valid(self, deep: bool = True) -> Optional[tuple[int, str]]:
        """Newest checkpoint that verifies, or None. Skipped ones are logged with their reason."""
        for step in reversed(self.steps()):
            path = self.path_for(step)
            ok, reason = self.verify(path, deep=deep)
            if ok:
                return step, path
            log.warning("checkpoint %s is not usable (%s); trying the previous one", path, reason)
        return None

    @staticmethod
    def read_meta(path: str) -> dict:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("meta", {})


# ---------------------------------------------------------------------------------------------
# The trainer's state: what a checkpoint holds besides the model and the engine
# ---------------------------------------------------------------------------------------------
def find_resume(cfg) -> Optional[str]:
    """The checkpoint to resume from: ``train.resume`` (a checkpoint directory, verified), the newest
    valid one under ``train.output_dir`` for ``auto``, or None."""
    r = cfg.train.resume
    if r is None:
        return None
    if r == "auto":
        found = CheckpointManager(cfg.train.output_dir).latest_valid()
        return None if found is None else found[1]
    ok, reason = CheckpointManager.verify(r)
    if not ok:
        raise ValueError(f"train.resume={r!r} is not a usable checkpoint: {reason}")
    return r


def load_hf_weights(model, path: str) -> None:
    """Load the Hugging Face checkpoint at ``path`` into ``model`` (same architecture and dtype)."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
    model.load_state_dict(src.state_dict())


def _trainer_state(tr) -> dict:
    from ..config import config_fingerprint

    return {
        "step": tr.step,
        "tracker": tr.tracker.state_dict(), "last_seen": tr.last_seen.cpu(), "meta": None if tr.meta is None else tr.meta.state_dict(),
        "weights_net": None if tr.meta_net is None else tr.meta_net.state_dict(),  # its feature statistics (baseline too)
        "sampler": tr.sampler.state_dict(), "counters": dict(tr.counters), "val_cursor": tr.val_cursor,
        "rng": {"python": random.getstate(), "numpy": _numpy_rng_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "fingerprint": config_fingerprint(tr.cfg),
    }


def save_checkpoint(tr, final: bool = False) -> str:
    """Checkpoint the trainer ``tr`` at its step (every rank calls this); with ``final`` also write
    ``final_model/`` in Hugging Face layout. Returns the checkpoint's path."""
    from ..config import config_fingerprint, save_yaml
    from .outputs import pair_weights, sigmoid, write_pair_table

    def writer(d: str) -> None:  # runs on every rank (DeepSpeed saves its partitions collectively)
        eng_state = tr.eng.save(d, tr.dist.is_main)
        if tr.dist.is_main:
            tr.tok.save_pretrained(os.path.join(d, "model"))
            torch.save({**_trainer_state(tr), **eng_state}, os.path.join(d, "trainer_state.pt"))
            save_yaml(tr.cfg, os.path.join(d, "config.yaml"))
            z, feats, w = pair_weights(tr)
            ds = tr.data.train
            write_pair_table(os.path.join(d, "pair_weights.csv"), np.arange(len(ds)), ds.source_rows, w, sigmoid(z), feats)

    path = tr.ckpt.save(tr.step, writer, meta={"fingerprint": config_fingerprint(tr.cfg), "step": tr.step})
    if final:
        final_dir = os.path.join(tr.run_dir, "final_model")
        tr.eng.save_pretrained(final_dir, tr.dist.is_main)
        if tr.dist.is_main:
            tr.tok.save_pretrained(final_dir)
    return path


def restore(tr, path: str) -> None:
    """Put the state saved at ``path`` back into the trainer ``tr`` (model, engine, tracker,
    meta-learner, sampler, counters, RNG) and drop metric lines logged after that step."""
    from ..config import check_resume_compatible

    check_resume_compatible(path, tr.cfg)  # names every differing field
    st = load_trainer_state(path)
    tr.eng.load(path, st, load_hf_weights)
    tr.tracker.load_state_dict(st["tracker"])
    tr.last_seen.copy_(st["last_seen"])
    if tr.meta is not None:
        tr.meta.load_state_dict(st["meta"])
    elif tr.meta_net is not None:
        tr.meta_net.load_state_dict(st["weights_net"])
    tr.sampler.load_state_dict(st["sampler"])
    tr.counters.update(st["counters"])
    tr.val_cursor = st["val_cursor"]
    tr.step = st["step"]
    random.setstate(st["rng"]["python"])
    _set_numpy_rng_state(st["rng"]["numpy"])
    torch.set_rng_state(st["rng"]["torch"])
    if st["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["rng"]["cuda"])
    _truncate_metrics(os.path.join(tr.run_dir, "metrics.jsonl"), tr.step)


def load_trainer_state(path: str) -> dict:
    """``trainer_state.pt`` of the checkpoint ``path``, loaded without unpickling arbitrary objects
    (``torch.load(weights_only=True)``: tensors, containers and plain values only), so this file cannot
    run code. Raises :class:`CheckpointError` naming the file. Not covered: a DeepSpeed run's
    ``deepspeed/`` folder, which DeepSpeed loads itself with pickle; and checkpoints written before this
    format (numpy arrays in the RNG state) are refused."""
    f = os.path.join(path, "trainer_state.pt")
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{f} is not a metapo_fast trainer state that loads safely (tensors and plain values only); "
                              f"refusing to unpickle it: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def _numpy_rng_state() -> tuple:
    """numpy's global RNG state with its key array as a tensor (``weights_only`` loads no numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _set_numpy_rng_state(st) -> None:
    name, keys, pos, has_gauss, gauss = st
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after ``step`` by the run that crashed, so the resumed log has no duplicates."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))
