"""The fused ops, each in one file with its PyTorch reference beside its dispatch:

- ``preference_loss.py``: the fused linear preference loss (public function, ``nn.Module``,
  ``torch.library`` custom op with fake and autograd).
- ``chunking.py``: the one chunk schedule (pairs or token blocks per chunk) used by the loss, the
  ghost pass and the meta pass.
- ``lce_epilogue.py``: per-row log-sum-exp / target log-prob / KL and the in-place softmax gradient;
  input checks, dispatch Triton / C++ / torch, and ``lce_epilogue_*_ref``.
- ``tracker_update.py``: the per-pair history update (Welford + EMAs); dispatch and ``tracker_update_ref``.
- ``dispatch.py``: the ``backend=`` choice and the build of the C++ ops in ``csrc/``.

May import: ``losses``, ``kernels`` (Triton), ``csrc``. Nothing from ``metapo/``, ``models/``, ``train/``.
"""
