"""Third-party modules imported only when used: ``flwr_datasets`` imports its plotting
(matplotlib, seaborn, scipy.stats: ~1 s of every process that partitions data, Ray actors and
node workers included) whenever any part of it is imported, and this library never plots."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

FLWR_DATASETS_PLOTS = "flwr_datasets.visualization"


def defer_submodule(name: str) -> None:
    """Put a stand-in for package submodule ``name`` in ``sys.modules`` before its package is
    imported: the package's own ``from . import <name>`` takes the stand-in, and the first attribute
    asked of it imports the real module. Nothing happens when the package is already imported."""
    package, _, _ = name.rpartition(".")
    if package in sys.modules or name in sys.modules:
        return
    spec = importlib.util.find_spec(package)  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return
    stand_in = types.ModuleType(name)
    stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    folder = Path(spec.submodule_search_locations[0]) / name.rpartition(".")[2]
    if folder.is_dir():  # its own submodules import as usual (without its __init__ until used)
        stand_in.__path__ = [str(folder)]

    def load(attribute: str) -> Any:
        if attribute.startswith("__"):  # what a scan of sys.modules asks (inspect.getmodule)
            raise AttributeError(attribute)
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        real = importlib.import_module(name)
        setattr(sys.modules[package], name.rpartition(".")[2], real)
        return getattr(real, attribute)

    stand_in.__getattr__ = load  # type: ignore[method-assign]
    sys.modules[name] = stand_in
