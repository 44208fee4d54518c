"""Adapters around Hugging Face causal LMs:

- ``hf.py``: the decoder's last hidden states and the LM head (the fused loss replaces the head).
- ``varlen.py``: padding-free packed pairs with variable-length attention.
- ``liger.py``: Liger-Kernel's RMSNorm / SwiGLU / RoPE in one model instance (no global patch).
- ``offload.py``: a host-resident reference model streamed to the GPU one block at a time.

May import: torch, transformers, liger-kernel. Nothing from ``metapo/`` or ``train/``.
"""
