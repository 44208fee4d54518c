"""The trainer behind ``torchrun -m metapo_fast.train`` (``__main__.py`` -> ``cli.main``).

- ``cli.py``: command line -> config -> process group -> ``Trainer(cfg, dist).train()``.
- ``loop.py``: the training loop, top to bottom (micro-batches, step, meta-update every K from ``meta.start_fraction`` of the run, logging).
- ``forward.py``: one micro-batch's forward: policy and reference hidden states, the fused loss.
- ``setup.py``: tokenizer, policy, reference, SFT warm-up, data and its validation split.
- ``state.py``: crash-safe checkpoints and exact resume.
- ``parallel.py``: process groups, the plain and DeepSpeed engines, the sharded reference.
- ``outputs.py``: metrics logging, evaluation scores, the summary and the pair-weights table.

May import everything else in the package; nothing outside ``train/`` imports from it except
``report.py`` (to read checkpoints) and the benchmarks.
"""
