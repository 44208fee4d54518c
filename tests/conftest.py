"""Test-session setup. Without a GPU, Triton kernels run under the interpreter, which must be
enabled before triton is first imported (liger-kernel, deepspeed and our kernels import it)."""
import os

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; its CPU twin (interpreter / C++ test) covers the same logic")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
