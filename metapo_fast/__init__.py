"""metapo_fast: fused, meta-weighted preference optimisation (MetaPO, Li, Zhou, Zhao, ACL Findings 2026).

Public API:
    fused_linear_preference_loss, FusedLinearPreferenceLoss, PreferenceLossOutput  (the fused LM-head loss)
    TemporalTracker                                                                 (per-pair history, 24 B/pair)
    MetaWeightNet, MetaLearner                                                      (weights and their bilevel update)
    LOSSES, register_loss, get_loss, LossParams, PairBatch, pair_loss               (the loss registry)
    MetaPOConfig, load_config                                                       (the trainer's configuration)
"""
from .config import MetaPOConfig, load_config
from .ops.preference_loss import FusedLinearPreferenceLoss, PreferenceLossOutput, fused_linear_preference_loss
from .losses import LOSSES, LossParams, PairBatch, get_loss, pair_loss, register_loss
from .metapo.weight_net import MetaWeightNet
from .metapo.tracker import TemporalTracker

__version__ = "0.1.0"


def __getattr__(name):  # the meta-learner pulls in more machinery: imported on first use
    if name == "MetaLearner":
        from .metapo.bilevel import MetaLearner

        return MetaLearner
    raise AttributeError(f"module 'metapo_fast' has no attribute {name!r}")


__all__ = ["fused_linear_preference_loss", "FusedLinearPreferenceLoss", "PreferenceLossOutput", "TemporalTracker",
           "MetaWeightNet", "MetaLearner", "LOSSES", "LossParams", "PairBatch", "get_loss", "pair_loss", "register_loss",
           "MetaPOConfig", "load_config", "__version__"]
