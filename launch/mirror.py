"""Fill a local Hub mirror from the Hub, for nodes that cannot reach it.

Writes ``<mirror>/<repo_id>/<config>/<split>-00000-of-00001.parquet``, the layout that
``finetune.hub`` resolves first.

    python -m launch.mirror --mirror data/hub nyu-mll/glue:sst2 nyu-mll/glue:mrpc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import datasets


def mirror_dataset(mirror: Path, repo_id: str, subset: str) -> list[Path]:
    folder = mirror / repo_id / subset
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, data in datasets.load_dataset(repo_id, subset).items():
        path = folder / f"{split}-00000-of-00001.parquet"
        data.to_parquet(str(path))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirror", type=Path, required=True)
    parser.add_argument("datasets", nargs="+", help="<repo_id>:<config>, e.g. nyu-mll/glue:sst2")
    args = parser.parse_args(argv)
    for item in args.datasets:
        repo_id, _, subset = item.partition(":")
        if not subset:
            parser.error(f"{item!r}: expected <repo_id>:<config>")
        for path in mirror_dataset(args.mirror, repo_id, subset):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
