"""Crash-safe checkpoints: a checkpoint is either complete and verified, or it does not exist.

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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Callable, Optional

__all__ = ["CheckpointManager", "CheckpointError", "fsync_dir", "atomic_write_bytes", "atomic_write_text", "sha256_file"]

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` so that it holds either its old content or all of ``data``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
            with open(os.path.join(tmp, rel), "rb") as f:
                os.fsync(f.fileno())
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
