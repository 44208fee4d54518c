"""C++ CPU implementations (compiled on first use, see metapo_fast._cpp)."""
