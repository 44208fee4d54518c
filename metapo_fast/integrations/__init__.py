"""Integrations with other trainers: ``trl.py`` (TRL's ``DPOTrainer`` with the fused loss, the tracker
and the meta-updates). May import ``ops``, ``metapo``, ``models``, ``losses``; nothing from ``train/``."""
