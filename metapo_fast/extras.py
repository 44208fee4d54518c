"""Optional dependencies. ``pip install metapo-fast`` brings what the fused loss and the trainer's
single-process path need; each feature below names the extra that brings its package, and fails
with that name, not a bare ``ModuleNotFoundError``, when it is missing."""
from __future__ import annotations

import importlib

__all__ = ["EXTRAS", "MissingExtraError", "require"]

# module -> (pip extra, what needs it)
EXTRAS = {
    "deepspeed": ("deepspeed", "DeepSpeed ZeRO (train.deepspeed, or more than one rank)"),
    "liger_kernel": ("liger", "Liger-Kernel modules (model.use_liger_kernels) and the Liger benchmarks"),
    "matplotlib": ("report", "the report's plots (python -m metapo_fast.report)"),
    "jinja2": ("report", "the report's HTML page (python -m metapo_fast.report)"),
    "trl": ("trl", "the TRL integration (metapo_fast.integrations.trl)"),
}


class MissingExtraError(ImportError):
    """A feature's optional package is not installed; the message names the pip extra."""


def require(module: str):
    """Import ``module`` (a key of :data:`EXTRAS`), or raise :class:`MissingExtraError` naming the extra."""
    extra, what = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{what} needs the '{module}' package, which is not installed: "
                                f"pip install 'metapo-fast[{extra}]'") from exc
