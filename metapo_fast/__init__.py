"""metapo_fast: fused, meta-weighted preference optimisation (MetaPO, Li, Zhou, Zhao, ACL Findings 2026)."""
from .losses import LOSSES, LossParams, PairBatch, get_loss, pair_loss, register_loss
from .meta_net import MetaWeightNet

__version__ = "0.1.0"

__all__ = ["LOSSES", "LossParams", "PairBatch", "get_loss", "pair_loss", "register_loss", "MetaWeightNet", "__version__"]
