"""Triton kernels (GPU). Each file: one fused op; its PyTorch reference (``*_ref``) and
dispatch live in ``metapo_fast/ops/<op>.py``; nothing else lives here."""
