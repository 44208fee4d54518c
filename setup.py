"""Package layout: the top-level `kernels/` (Triton), `csrc/` (C++ sources, compiled on first use
by torch.utils.cpp_extension) and `configs/` (YAML / DeepSpeed settings) install as
`metapo_fast.kernels`, `metapo_fast.csrc` and `metapo_fast.configs`,
so the repository keeps the layout of the brief while the import namespace stays unique."""
from setuptools import setup

setup(
    packages=["metapo_fast", "metapo_fast.config", "metapo_fast.data", "metapo_fast.metapo", "metapo_fast.models",
              "metapo_fast.ops", "metapo_fast.train", "metapo_fast.integrations", "metapo_fast.kernels", "metapo_fast.csrc",
              "metapo_fast.configs"],
    package_dir={"metapo_fast.kernels": "kernels", "metapo_fast.csrc": "csrc", "metapo_fast.configs": "configs"},
    package_data={"metapo_fast.csrc": ["*.cpp", "*.h"], "metapo_fast.configs": ["*.yaml", "*.json", "*.md"], "metapo_fast": ["py.typed"]},
    include_package_data=True,
)
