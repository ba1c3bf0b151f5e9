"""The FAB (Flower app bundle) of an app, built as ``flwr run`` builds it, without walking what it
leaves out.

Flower's build first lists every file under the app (``collect_files``), then drops what .gitignore
and its publish rules exclude. With the project's virtual environment inside the app folder that is
over 100,000 files and 6–8 s for every run started. :func:`app_files` does not enter
the folders that .gitignore or those rules exclude whole, and hands the files it finds to Flower's
own ``build_fab_from_files``, so the FAB is the same bytes. A .gitignore that re-includes files
(``!pattern``) gets Flower's full walk. :func:`app_fab` keeps the last FAB per app until one of its
files changes.

    python -m launch.fab [--repeats 3]   # seconds: Flower's build against ours, and the same bytes?
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

#: app folder → (its files' paths, sizes and modification times, the FAB built from them)
_BUILT: dict[Path, tuple[tuple[tuple[str, int, int], ...], bytes]] = {}


def app_files(root: Path) -> dict[str, Path]:
    """What Flower's ``collect_files(root)`` returns, less files in folders excluded whole."""
    from flwr.cli.utils import build_pathspec, collect_files, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    root = root.expanduser().resolve()
    gitignore = root / ".gitignore"
    patterns = load_gitignore_patterns(gitignore.read_bytes()) if gitignore.is_file() else []
    if any(pattern.lstrip().startswith("!") for pattern in patterns):
        return collect_files(root)
    excluded = build_pathspec([*patterns, *APP_PUBLISH_EXCLUDE_PATTERNS])
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root, followlinks=False):
        here = Path(folder)
        relative = here.relative_to(root)
        subfolders[:] = [d for d in subfolders if not excluded.match_file(f"{(relative / d).as_posix()}/")]
        for name in names:
            path = here / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue  # as Flower's walk: no symlinks, nothing outside the app
            files[path.relative_to(root).as_posix()] = path
    return files


def app_fab(root: Path) -> bytes:
    """The FAB ``flwr run`` would build from ``root`` (the last one again while no file changed)."""
    from flwr.cli.build import build_fab_from_files

    root = root.expanduser().resolve()
    files = app_files(root)
    stats = {name: path.stat() for name, path in sorted(files.items())}
    state = tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items())
    built = _BUILT.get(root)
    if built is None or built[0] != state:
        built = _BUILT[root] = (state, build_fab_from_files(files)[0])
    return built[1]


def median_seconds(build: Callable[[], bytes], repeats: int) -> tuple[float, bytes]:
    times, built = [], b""
    for _ in range(repeats):
        start = time.perf_counter()
        built = build()
        times.append(time.perf_counter() - start)
    return statistics.median(times), built


def main(argv: list[str] | None = None) -> None:
    """Figures (medians of ``--repeats``): Flower's build of this app against :func:`app_fab`."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import collect_files

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--app", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    app = args.app.resolve()
    flower, flower_fab = median_seconds(lambda: build_fab_from_disk(app), args.repeats)

    def rebuilt() -> bytes:
        _BUILT.clear()
        return app_fab(app)

    ours, ours_fab = median_seconds(rebuilt, args.repeats)
    kept, _ = median_seconds(lambda: app_fab(app), args.repeats)
    print(f"files Flower lists {len(collect_files(app))}, launch.fab {len(app_files(app))}")
    print(f"build_fab_from_disk {flower:.2f} s | app_fab {ours:.2f} s | unchanged files {kept:.2f} s")
    print(f"same bytes: {flower_fab == ours_fab} ({len(ours_fab) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
