"""Optional dependencies (#15 item 5): the base install carries only what the fused loss and the
single-process trainer need; a feature whose package is missing names its pip extra."""
import os
import sys
import tomllib

import pytest

from metapo_fast.extras import EXTRAS, MissingExtraError, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]


def _names(reqs):
    return {r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}


def test_base_install_has_no_optional_package_and_every_extra_is_declared():
    base = _names(PROJECT["dependencies"])
    assert not base & {"deepspeed", "liger-kernel", "matplotlib", "trl", "pytest-benchmark"}
    assert {"torch", "transformers", "datasets", "numpy"} <= base
    extras = PROJECT["optional-dependencies"]
    test = _names(extras["test"])
    for module, (extra, _) in EXTRAS.items():
        package = module.replace("_", "-")
        assert package in _names(extras[extra]), (module, extra)
        assert package in test, f"README's install ([test]) must bring {package}"


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'metapo-fast\[deepspeed\]'"):
        require("deepspeed")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    from metapo_fast.models.liger import apply_liger_kernels

    with pytest.raises(MissingExtraError, match=r"metapo-fast\[liger\]"):
        apply_liger_kernels(object())


def test_trainer_without_deepspeed_refuses_a_deepspeed_run_at_start_up(tmp_path, monkeypatch, capsys):
    from metapo_fast.train.cli import main

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    out = tmp_path / "run"
    assert main([f"train.output_dir={out}", f"train.deepspeed={os.path.join(ROOT, 'configs', 'zero3.json')}",
                 "model.dtype=float32"]) == 2
    err = capsys.readouterr().err
    assert "metapo_fast.train: DeepSpeed ZeRO" in err and "metapo-fast[deepspeed]" in err and not out.exists()


def test_report_without_jinja2_exits_naming_the_extra(tmp_path, monkeypatch, capsys):
    import metapo_fast.report as R

    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setattr(R, "load_run", lambda d: (_ for _ in ()).throw(AssertionError("not reached")))
    assert R.main([str(tmp_path)]) == 2
    assert "metapo-fast[report]" in capsys.readouterr().err
