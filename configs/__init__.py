"""Run configurations shipped with metapo_fast (installed as ``metapo_fast.configs``): the YAML
files load with :func:`metapo_fast.config.load_config`; see README.md in this folder."""
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def config_path(name: str) -> str:
    """Absolute path of a shipped config, e.g. ``config_path("default.yaml")``."""
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.isfile(path):
        shipped = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith((".yaml", ".json")))
        raise FileNotFoundError(f"no shipped config {name!r}; available: {shipped}")
    return path
