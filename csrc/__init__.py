"""C++ CPU implementations of the fused ops (built on first use by ``metapo_fast.ops.dispatch.load_cpp``).
Each ``*.cpp`` registers its ops in ``TORCH_LIBRARY_FRAGMENT(metapo_fast_cpp, m)``; the PyTorch
reference each one must equal lives beside its dispatch in ``metapo_fast/ops/<op>.py``."""
