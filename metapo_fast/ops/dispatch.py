"""Choosing where an op runs, and building the C++ CPU ops.

``backend`` is ``"torch"`` (the PyTorch reference), ``"triton"`` (GPU kernels in ``kernels/``; on CPU
tensors only under ``TRITON_INTERPRET=1``), ``"cpp"`` (the C++ CPU ops in ``csrc/``), or ``"auto"``:
Triton for CUDA tensors, C++ for CPU tensors when it builds, else the reference with one warning.
Kernels are chosen explicitly by this argument; nothing is patched globally.

Every ``csrc/*.cpp`` registers its ops with ``TORCH_LIBRARY_FRAGMENT(metapo_fast_cpp, m)``; after
:func:`load_cpp` they are reachable as ``torch.ops.metapo_fast_cpp.<name>``. All sources go into one
shared library, compiled on first use (about a minute on 2 cores) and cached by torch under a name
keyed by the sources, the flags, the torch version and the compiler (:func:`cpp_build_name`), so two
environments or checkouts on one machine keep their own builds instead of rebuilding each other's.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import subprocess
import threading
import time
import warnings
from typing import Optional

import torch

__all__ = ["BACKENDS", "resolve_backend", "triton_interpreting", "load_cpp", "cpp_available", "cpp_unavailable_reason",
           "cpp_compiler_present"]

BACKENDS = ("auto", "torch", "triton", "cpp")
_warned: set[str] = set()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return the concrete backend for ``op`` on ``device``; raise ValueError for impossible requests."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu":
            if cpp_available():
                return "cpp"
            if op not in _warned:
                _warned.add(op)
                warnings.warn(f"{op}: C++ CPU ops unavailable, using the PyTorch reference ({cpp_unavailable_reason()})",
                              stacklevel=3)
        return "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got device {device}); "
            "for CPU tensors set TRITON_INTERPRET=1 before importing triton"
        )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' needs CPU tensors, got device {device}")
        load_cpp()  # raises RuntimeError with the reason
    return backend


# ---------------------------------------------------------------------------------------------
# The C++ CPU ops
# ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_loaded = False
_error: Optional[str] = None
log = logging.getLogger(__name__)
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]


def _cpu_model() -> str:
    """The host CPU's model name (the build uses -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        import platform

        return platform.processor()


def cpp_build_name(sources: list[str], compiler: str) -> str:
    """``metapo_fast_cpp_<hash>``: the hash covers the sources' bytes, the flags, the torch version,
    the compiler's path and version and the CPU model (-march=native), i.e. everything that changes
    the binary."""
    import torch

    h = hashlib.sha256()
    for src in sources:
        h.update(os.path.basename(src).encode())
        with open(src, "rb") as f:
            h.update(f.read())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, shutil.which(compiler), version, _cpu_model())).encode())
    return f"metapo_fast_cpp_{h.hexdigest()[:12]}"


def _sources() -> list[str]:
    from .. import csrc  # installed from the repository's top-level csrc/

    here = os.path.dirname(os.path.abspath(csrc.__file__))
    return sorted(glob.glob(os.path.join(here, "*.cpp")))


def load_cpp(verbose: bool = False) -> None:
    """Compile (if needed) and load the C++ ops. Raises RuntimeError with the reason on failure."""
    global _loaded, _error
    with _lock:
        if _loaded:
            return
        if _error is not None:
            raise RuntimeError(_error)
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            _error = (
                f"metapo_fast: the C++ CPU ops need a C++ compiler, and '{compiler}' was not found on PATH. "
                "Install g++ (e.g. `apt-get install g++`) or set CXX; until then use backend='torch'."
            )
            raise RuntimeError(_error)
        sources = _sources()
        if not sources:
            _error = "metapo_fast: no C++ sources found in metapo_fast/csrc (broken install?)"
            raise RuntimeError(_error)
        from torch.utils import cpp_extension

        name = cpp_build_name(sources, compiler)
        build_dir = getattr(cpp_extension, "_get_build_directory", None)  # private; only for the progress line
        try:
            built = build_dir is None or os.path.exists(os.path.join(build_dir(name, verbose=False), f"{name}.so"))
        except OSError:
            built = True  # no progress line; the build below reports its own errors
        if not built:
            log.info("metapo_fast: building the C++ CPU ops (first use of these sources; about a minute) ...")
        t0 = time.perf_counter()
        try:
            cpp_extension.load(name=name, sources=sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=False,
                  verbose=verbose)
        except Exception as exc:  # compile or link error: keep the compiler's message
            _error = f"metapo_fast: building the C++ CPU ops from {os.path.dirname(sources[0])} failed: {exc}"
            raise RuntimeError(_error) from exc
        if not built:
            log.info("metapo_fast: C++ CPU ops built in %.0f s (%s)", time.perf_counter() - t0, name)
        _loaded = True


def cpp_compiler_present() -> bool:
    """Whether a C++ compiler (``$CXX`` or ``c++``) is on PATH. With one, a failed build is an error to
    report (tests fail), not a reason to skip."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def cpp_available() -> bool:
    """True when the C++ ops are (or can be) loaded; never raises."""
    try:
        load_cpp()
    except RuntimeError:
        return False
    return True


def cpp_unavailable_reason() -> Optional[str]:
    return None if cpp_available() else _error

