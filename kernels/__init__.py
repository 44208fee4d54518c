"""Triton kernels (GPU). Each file: one fused op; its PyTorch reference lives in metapo_fast.reference."""
