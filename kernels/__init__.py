"""Triton kernels (GPU). Each file: one fused op; its PyTorch reference (``*_ref``) and
dispatch live in ``metapo_fast/ops/<op>.py``; nothing else lives here.

This folder is installed and imported as ``metapo_fast.kernels``. Run from a checkout's root
(``python -m ...``, ``torchrun -m ...``, pytest), the root is on ``sys.path`` and the folder would
also answer to the top-level name ``kernels``: the name of Hugging Face's ``kernels`` package, which
transformers >= 5.25 requires and imports from ``transformers.activations``. Imported under that
name, this file hands the import to the first ``kernels`` found elsewhere on ``sys.path``, so a
checkout never shadows it. With none installed it stays this inert module, without a
``__version__``: transformers before 5.25 probes ``kernels`` by importing it and reads a module
without a version as "not available".
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _load_the_other_kernels():
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        elsewhere = [p for p in sys.path
                     if not isinstance(p, str) or os.path.abspath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _load_the_other_kernels()
