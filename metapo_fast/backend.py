"""Choosing an implementation of an op: ``"torch"`` (reference), ``"triton"`` (GPU kernels; on CPU
tensors only under ``TRITON_INTERPRET=1``), ``"cpp"`` (the C++ CPU ops in ``csrc/``), or ``"auto"``:
Triton for CUDA tensors, C++ for CPU tensors when it builds, else the reference with one warning.
Kernels are chosen explicitly by this argument; nothing is patched globally.
"""
from __future__ import annotations

import os
import warnings

import torch

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
            from . import _cpp

            if _cpp.available():
                return "cpp"
            reason = _cpp.unavailable_reason()
            if op not in _warned:
                _warned.add(op)
                warnings.warn(f"{op}: C++ CPU ops unavailable, using the PyTorch reference ({reason})", stacklevel=3)
        return "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got device {device}); "
            "for CPU tensors set TRITON_INTERPRET=1 before importing triton"
        )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' needs CPU tensors, got device {device}")
        from . import _cpp

        _cpp.load()  # raises RuntimeError with the reason
    return backend
