"""The run configuration: a typed tree of dataclasses with a docstring per field, loaded from YAML
plus dotted command-line overrides, checked at start-up.

- ``schema.py``: the sections (model, data, loss, tracker, meta, train) and the checks that span them.
- ``loading.py``: YAML in and out, overrides, ``describe()``, resume fingerprints, the DeepSpeed file.
- ``tree.py``: the generic machinery (type coercion, unknown-key errors) over any dataclass tree.

May import: ``losses`` and ``metapo.weight_net`` (lazily, to validate names). Nothing from ``train/``.
"""
from .loading import (CONFIG_FILENAME, RESUME_MUTABLE_FIELDS, check_resume_compatible, config_diff, config_fingerprint,
                      config_from_argv, deepspeed_config, describe, load_config, parse_overrides, save_yaml, to_dict)
from .schema import (DataConfig, LossConfig, MetaConfig, MetaPOConfig, ModelConfig, SyntheticConfig, TinyModelConfig,
                     TrackerConfig, TrainConfig)
from .tree import ConfigError, from_dict

__all__ = [
    "ConfigError", "ModelConfig", "TinyModelConfig", "DataConfig", "SyntheticConfig", "LossConfig",
    "TrackerConfig", "MetaConfig", "TrainConfig", "MetaPOConfig", "RESUME_MUTABLE_FIELDS", "CONFIG_FILENAME",
    "load_config", "parse_overrides", "from_dict", "to_dict", "save_yaml", "config_fingerprint",
    "config_diff", "check_resume_compatible", "describe", "deepspeed_config", "config_from_argv",
]
