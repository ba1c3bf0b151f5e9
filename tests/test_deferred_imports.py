"""A deferred submodule loads on first use, not with its package (flwr_datasets' plotting)."""

import inspect
import sys

import pytest

from finetune.deferred_imports import defer_submodule

PACKAGE = "deferral_probe"


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """A package whose ``__init__`` imports its heavy submodule, which records that it ran."""
    folder = tmp_path / PACKAGE
    folder.mkdir()
    (folder / "__init__.py").write_text("from . import heavy\n")
    (folder / "heavy.py").write_text("import builtins\nbuiltins.deferral_probe_loads += 1\nVALUE = 42\n")
    (folder / "plots").mkdir()  # a subpackage, as flwr_datasets.visualization is
    (folder / "plots" / "__init__.py").write_text("import builtins\nbuiltins.deferral_probe_loads += 1\n")
    (folder / "plots" / "bars.py").write_text("WIDTH = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins.deferral_probe_loads", 0, raising=False)
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def test_the_submodule_loads_on_first_use_not_with_its_package(probe_package):
    import builtins

    defer_submodule(f"{PACKAGE}.heavy")
    package = __import__(PACKAGE)
    inspect.getmodule(test_the_submodule_loads_on_first_use_not_with_its_package)  # scans sys.modules
    assert builtins.deferral_probe_loads == 0
    assert package.heavy.VALUE == 42 and builtins.deferral_probe_loads == 1
    from deferral_probe.heavy import VALUE

    assert VALUE == 42 and builtins.deferral_probe_loads == 1  # loaded once
    assert sys.modules[f"{PACKAGE}.heavy"] is package.heavy


def test_without_the_deferral_the_package_loads_it(probe_package):
    import builtins

    __import__(PACKAGE)
    assert builtins.deferral_probe_loads == 1  # the control: the probe does load it eagerly


def test_a_deferred_subpackage_still_imports_its_own_submodules(probe_package):
    import builtins

    defer_submodule(f"{PACKAGE}.plots")
    __import__(PACKAGE)
    from deferral_probe.plots.bars import WIDTH

    assert WIDTH == 3 and builtins.deferral_probe_loads == 1  # heavy ran; the plots' __init__ did not
