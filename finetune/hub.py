"""Resolve Hub ids to a local mirror first, so the same code runs connected and air-gapped.

Mirror layout (the Hub's own parquet layout): ``<mirror>/<repo_id>/<config>/<split>-*.parquet``
for datasets and ``<mirror>/<repo_id>/config.json`` for models.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

HUB_MIRROR_ENV = "FEDSUBSPACE_HUB_MIRROR"
PACKAGE_PREFIX = "package:"


def hub_mirror(setting: str = "") -> Path | None:
    """The mirror root from a setting, else ``$FEDSUBSPACE_HUB_MIRROR``; None when neither is set."""
    value = setting or os.environ.get(HUB_MIRROR_ENV, "")
    return Path(value).expanduser().resolve() if value else None


def mirrored_dataset_dir(mirror: Path | None, repo_id: str, subset: str) -> Path | None:
    """The mirror folder holding ``repo_id``/``subset`` parquet files, if there is one."""
    if mirror is None:
        return None
    folder = mirror / repo_id / subset
    return folder if any(folder.glob("*.parquet")) else None


def resolve_model_source(source: str, mirror: Path | None) -> str:
    """A local folder for ``source`` when one exists (package, folder, mirror), else the Hub id."""
    if source.startswith(PACKAGE_PREFIX):
        package, _, subfolder = source[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model source {source!r}: Python package {package!r} is not installed "
                f"(pip install {package.replace('_', '-')})"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"model source {source!r}: {folder} does not exist")
        return str(folder)
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if mirror is not None and (mirror / source / "config.json").is_file():
        return str(mirror / source)
    return source


def default_hub_mirror() -> str:
    """$FEDSUBSPACE_HUB_MIRROR, else the shared offline mirror beside the checkout, else none."""
    configured = os.environ.get(HUB_MIRROR_ENV, "")
    if configured:
        return str(Path(configured).expanduser().resolve())
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "hub"
    return str(beside.resolve()) if beside.is_dir() else ""
