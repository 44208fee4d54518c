"""docs/reliability.md names, for every fault, the test that proves it: those tests must exist."""
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_test_named_in_reliability_md_exists():
    text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    refs = re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?`|`::(\w+)`", text)
    assert len(refs) >= 12
    module = None
    for path, name, cont in refs:
        if path:
            assert os.path.exists(os.path.join(ROOT, path)), path
            module = importlib.import_module(path[:-3].replace("/", "."))
        name = name or cont
        if name:
            assert hasattr(module, name), f"{module.__name__}::{name} named in docs/reliability.md does not exist"
