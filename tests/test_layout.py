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


# --- the checkout's kernels/ never shadows Hugging Face's `kernels` (transformers >= 5.25 imports it) ---

def _run_from_root(code: str):
    """``python -c code`` with the checkout's root as the working directory (so it is sys.path[0],
    as under ``python -m``, torchrun and pytest)."""
    import subprocess
    import sys
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _fake_hf_kernels(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("ORIGIN = 'elsewhere'\nfrom kernels.sub import VALUE\n")
    (site / "kernels" / "sub.py").write_text("VALUE = 3\n")
    return str(site)


def test_top_level_kernels_is_the_other_package_when_one_is_installed(tmp_path):
    site = _fake_hf_kernels(tmp_path)
    code = ("import kernels, kernels.sub\n"
            "assert kernels.ORIGIN == 'elsewhere' and kernels.VALUE == 3, kernels.__file__\n"
            "import metapo_fast.kernels as ours\n"
            "assert ours.__file__.endswith('kernels/__init__.py') and not hasattr(ours, 'ORIGIN')\n"
            "print(kernels.__file__)\n")
    # the fake goes first among the others, so an installed real one (CI) does not answer instead
    r = _run_from_root("import sys\nsys.path.insert(1, " + repr(site) + ")\n" + code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(site, "kernels", "__init__.py")


def test_top_level_kernels_is_inert_when_none_is_installed():
    """transformers < 5.25 probes ``kernels`` by importing it (find_spec finds the checkout's folder)
    and reads a module without ``__version__`` as not available: the probe must not raise."""
    code = ("sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'editable' not in p]\n"
            "import importlib, importlib.util, os\n"
            "assert importlib.util.find_spec('kernels') is not None\n"
            "m = importlib.import_module('kernels')\n"
            "assert getattr(m, '__version__', 'N/A') == 'N/A' and m.__file__ is not None\n"
            "assert os.path.samefile(m.__file__, os.path.join('kernels', '__init__.py'))\n"
            "print('inert')\n")
    r = _run_from_root("import sys\n" + code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "inert"


def test_transformers_imports_hugging_face_kernels_from_the_checkout_root():
    """transformers >= 5.25 requires Hugging Face's ``kernels`` and imports it with every model."""
    from importlib import metadata
    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25)")
    r = _run_from_root("import transformers.activations, kernels, os\n"
                       "assert not os.path.samefile(os.path.dirname(kernels.__file__), 'kernels'), kernels.__file__\n"
                       "import metapo_fast.kernels.tracker\n")
    assert r.returncode == 0, r.stderr
