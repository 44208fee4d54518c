"""Package layout: the top-level `kernels/` (Triton) and `csrc/` (C++ sources, compiled on
first use by torch.utils.cpp_extension) install as `metapo_fast.kernels` and `metapo_fast.csrc`,
so the repository keeps the layout of the brief while the import namespace stays unique."""
from setuptools import setup

setup(
    packages=["metapo_fast", "metapo_fast.integrations", "metapo_fast.kernels", "metapo_fast.csrc"],
    package_dir={"metapo_fast.kernels": "kernels", "metapo_fast.csrc": "csrc"},
    package_data={"metapo_fast.csrc": ["*.cpp", "*.h"], "metapo_fast": ["py.typed"]},
    include_package_data=True,
)
