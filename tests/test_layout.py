"""The import rules of docs/architecture.md: each folder imports only what sits below it, so the
fused ops can be used without the trainer and the paper's parts without the run machinery."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "metapo_fast")

# folder -> subpackages of metapo_fast it must not import (at module level or inside functions)
FORBIDDEN = {
    "ops": {"metapo", "models", "data", "config", "train", "integrations", "report"},
    "metapo": {"data", "config", "train", "integrations", "report"},
    "models": {"ops", "metapo", "data", "config", "train", "integrations", "report"},
    "data": {"ops", "metapo", "models", "train", "integrations", "report"},
    "config": {"data", "models", "train", "integrations", "report"},
    "integrations": {"train", "data", "config", "report"},
}


def imported_subpackages(path: str, package: str) -> set[str]:
    """First component under metapo_fast of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "metapo_fast" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_what_sits_below_it(folder):
    d = os.path.join(PKG, folder)
    files = [f for f in os.listdir(d) if f.endswith(".py")]
    assert files
    bad = {}
    for f in files:
        found = imported_subpackages(os.path.join(d, f), f"metapo_fast.{folder}") & FORBIDDEN[folder]
        if found:
            bad[f] = sorted(found)
    assert not bad, f"metapo_fast/{folder}/ imports what docs/architecture.md forbids: {bad}"


def test_the_rule_checker_sees_relative_and_lazy_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from ..train.loop import Trainer\n\ndef f():\n    from .. import report\n    import metapo_fast.data.pairs\n")
    assert imported_subpackages(str(p), "metapo_fast.ops") == {"train", "report", "data"}


def test_kernels_are_triton_only():
    """kernels/ holds Triton kernels and their launchers; dispatch and references live in ops/."""
    d = os.path.join(ROOT, "kernels")
    for f in os.listdir(d):
        if f.endswith(".py") and f != "__init__.py":
            assert "triton" in imported_modules(os.path.join(d, f)), f
            assert not imported_subpackages(os.path.join(d, f), "metapo_fast.kernels"), f


def imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
