"""Liger-Kernel's fused RMSNorm and SwiGLU for a model *instance*, enabled explicitly by
``model.use_liger_kernels``. Liger's own ``apply_liger_kernel_to_*`` also rebinds names inside
transformers' modeling modules (a global patch that changes every model of that class in the
process); this swaps only this model's modules, copying their weights. RoPE is left to
transformers (Liger replaces it through a module-level function). The kernels are Triton: CUDA,
or the Triton interpreter on CPU in tests.
"""
from __future__ import annotations

from torch import nn

__all__ = ["apply_liger_kernels"]


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight") and hasattr(m, "variance_epsilon")


def _is_swiglu(m: nn.Module, config) -> bool:
    act = getattr(config, "hidden_act", None)
    return all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")) and act in ("silu", "swish")


def apply_liger_kernels(model: nn.Module) -> dict[str, int]:
    """Replace the RMSNorm and SwiGLU-MLP modules of ``model`` by Liger's; returns counts."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    counts = {"rms_norm": 0, "swiglu": 0}
    for name, mod in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _is_rmsnorm(mod):
            new = LigerRMSNorm(mod.weight.shape[0], eps=mod.variance_epsilon, in_place=False)
            counts["rms_norm"] += 1
        elif _is_swiglu(mod, model.config):
            new = LigerSwiGLUMLP(model.config)
            counts["swiglu"] += 1
        else:
            continue
        new.load_state_dict(mod.state_dict())
        setattr(parent, child, new.to(device=next(mod.parameters()).device, dtype=next(mod.parameters()).dtype))
    return counts
