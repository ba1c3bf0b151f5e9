"""The app bundle built without walking ignored folders is the one ``flwr run`` builds."""

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files

from launch import fab
from launch.simulation import PROJECT_DIR


@pytest.fixture
def app(tmp_path):
    """A small copy of this app with an ignored virtual environment, run folder and symlink."""
    root = tmp_path / "app"
    files = {
        "pyproject.toml": (PROJECT_DIR / "pyproject.toml").read_text(),
        ".gitignore": ".venv/\nruns/\n__pycache__/\n",
        "server_app/app.py": "app = None\n",
        "conf/config.yaml": "a: 1\n",
        "docs/index.md": "# docs\n",
        "tests/conftest.py": "",
        "runs/20260101/metrics.jsonl": "{}\n",
        "server_app/__pycache__/app.cpython-311.pyc": "",
        **{f".venv/lib/site-packages/pkg{i}/__init__.py": "" for i in range(50)},
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "outside.py").write_text("x = 1\n")
    (root / "server_app" / "linked.py").symlink_to(tmp_path / "outside.py")
    return root


def test_the_bundle_is_flwr_runs_without_entering_ignored_folders(app):
    listed = fab.app_files(app)
    assert "server_app/app.py" in listed and "conf/config.yaml" in listed
    assert not [name for name in listed if name.startswith((".venv/", "runs/")) or "__pycache__" in name]
    assert "server_app/linked.py" not in listed  # as Flower's walk: no symlinks
    assert fab.app_fab(app) == build_fab_from_disk(app)


def test_a_changed_file_rebuilds_the_bundle_and_a_reinclude_walks_everything(app):
    first = fab.app_fab(app)
    assert fab.app_fab(app) is first  # nothing changed: the bundle kept
    (app / "server_app" / "app.py").write_text("app = 'changed'\n")
    assert fab.app_fab(app) != first and fab.app_fab(app) == build_fab_from_disk(app)
    (app / ".gitignore").write_text(".venv/\nruns/\n!runs/20260101/metrics.jsonl\n")
    assert fab.app_files(app) == collect_files(app.resolve())  # git's rules for `!`: Flower's walk
