"""Build and load the C++ CPU ops in ``csrc/`` (compiled on first use, cached by torch).

Every ``csrc/*.cpp`` registers its ops with ``TORCH_LIBRARY_FRAGMENT(metapo_fast_cpp, m)``; after
:func:`load` they are reachable as ``torch.ops.metapo_fast_cpp.<name>``. All sources go into one
shared library so the (slow: ~1 min on 2 cores) compile happens once per source change.
"""
from __future__ import annotations

import glob
import os
import shutil
import threading
from typing import Optional

_lock = threading.Lock()
_loaded = False
_error: Optional[str] = None


def _sources() -> list[str]:
    from . import csrc  # installed from the repository's top-level csrc/

    here = os.path.dirname(os.path.abspath(csrc.__file__))
    return sorted(glob.glob(os.path.join(here, "*.cpp")))


def load(verbose: bool = False) -> None:
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
        from torch.utils.cpp_extension import load as _load

        try:
            _load(
                name="metapo_fast_cpp",
                sources=sources,
                extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compile or link error: keep the compiler's message
            _error = f"metapo_fast: building the C++ CPU ops from {os.path.dirname(sources[0])} failed: {exc}"
            raise RuntimeError(_error) from exc
        _loaded = True


def available() -> bool:
    """True when the C++ ops are (or can be) loaded; never raises."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> Optional[str]:
    return None if available() else _error
