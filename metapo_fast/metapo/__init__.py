"""MetaPO's parts, named as in the paper (Li, Zhou, Zhao 2026; docs/math.md sections 3-5):

- ``tracker.py``: ``TemporalTracker``, each pair's training history (Sec. 3.2), 24 bytes per pair.
- ``weight_net.py``: ``MetaWeightNet``, the weights w_phi(s) from the temporal features (Sec. 3.3).
- ``ghost.py``: ghost dot products c_i = <G, grad l_i> without per-sample gradients (Sec. 3.5).
- ``bilevel.py``: ``MetaLearner``, the meta-objective and the first-order phi update (Sec. 3.4).

May import: ``ops``, ``losses``, ``models.hf`` (hidden states of a causal LM), ``comm``.
Nothing from ``train/``.
"""
