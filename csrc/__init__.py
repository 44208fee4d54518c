"""C++ CPU implementations (compiled on first use, see metapo_fast.ops._cpp)."""
