"""Seconds to build this app's bundle (FAB) before a run: Flower's ``build_fab_from_disk`` (what
``flwr run`` does: it lists every file under the app, ``.venv/`` included) against
``launch.fab.app_fab`` (it skips the folders ``.gitignore`` excludes whole), and whether the bytes
are the same.

    python -m benchmarks.fab [--repeats 3]

Prints figures (median of the repeats); asserts nothing (tests/test_fab.py checks the bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from launch import fab
from launch.simulation import PROJECT_DIR


def seconds(build: Callable[[], bytes], repeats: int) -> tuple[float, bytes]:
    times, built = [], b""
    for _ in range(repeats):
        start = time.perf_counter()
        built = build()
        times.append(time.perf_counter() - start)
    return statistics.median(times), built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import collect_files

    app = Path(PROJECT_DIR).resolve()
    flower, flower_fab = seconds(lambda: build_fab_from_disk(app), args.repeats)

    def fresh() -> bytes:
        fab._BUILT.clear()
        return fab.app_fab(app)

    ours, ours_fab = seconds(fresh, args.repeats)
    kept, _ = seconds(lambda: fab.app_fab(app), args.repeats)
    print(f"files Flower lists: {len(collect_files(app))}")
    print(f"files launch.fab lists: {len(fab.app_files(app))}; bundle {len(ours_fab) / 1e6:.2f} MB")
    print(f"build_fab_from_disk {flower:.2f} s | app_fab {ours:.2f} s | unchanged files {kept:.2f} s")
    print(f"same bytes: {flower_fab == ours_fab}")


if __name__ == "__main__":
    main()
