"""The tuning stage's choice: per dataset and method, the peak learning rate (of a log-spaced grid of
multiples of the method's own default) that scored best on the tuning split — a split carved from
the training data and held out of every client, never the reported validation split.

    python -m benchmarks.tuning --preset cpu-paired     # results/cpu-paired-tune → docs/results/cpu-paired

Writes ``tuned.json`` (read by the reported sweep's ``tuned`` key) and ``tuning.md`` (the grid, the
choice and the tuning curve per method; the report includes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from finetune.config import higher_is_better

PROJECT_DIR = Path(__file__).resolve().parents[1]


def tuning_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[float, float]]]:
    """``cell -> method -> peak lr -> final metric on the tuning split`` (mean over seeds); a cell
    is ``<dataset>/<setting>`` (the sweep's ``tuning_key``), or the dataset for records without a
    setting."""
    scores: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for record in records:
        final = record["rounds"][-1]["metric"]
        if final is not None:
            scores[tuning_cell(record)][record["method"]][float(record["lr"])].append(float(final))
    return {
        dataset: {
            method: {lr: float(np.mean(v)) for lr, v in sorted(grid.items())}
            for method, grid in methods.items()
        }
        for dataset, methods in scores.items()
    }


def tuning_cell(record: dict[str, Any]) -> str:
    setting = record.get("setting")
    return f"{record['dataset']}/{setting}" if setting else str(record["dataset"])


def write_tuned(records: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """``tuned.json`` and ``tuning.md`` in ``out`` from the tuning runs' records."""
    if not records:
        return {}
    main_metric = records[0]["main_metric"]
    chosen = choose(tuning_curves(records), main_metric)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuned.json").write_text(json.dumps(chosen, indent=2, sort_keys=True) + "\n")
    (out / "tuning.md").write_text(tuning_markdown(chosen, main_metric) + "\n")
    return chosen


def choose(curves: dict[str, dict[str, dict[float, float]]], main_metric: str) -> dict[str, Any]:
    """The best grid point per dataset and method, and where it sits in the grid (a choice at the
    grid's edge says the grid should have gone further)."""
    pick = max if higher_is_better(main_metric) else min
    chosen: dict[str, Any] = {}
    for dataset, methods in curves.items():
        for method, grid in methods.items():
            best = pick(grid, key=lambda lr: grid[lr])
            edge = len(grid) > 1 and best in (min(grid), max(grid))
            chosen.setdefault(dataset, {})[method] = {
                "overrides": {"method.lr": best},
                "score": grid[best],
                "grid": {f"{lr:g}": score for lr, score in grid.items()},
                "at_grid_edge": edge,
            }
    return chosen


def tuning_markdown(chosen: dict[str, Any], main_metric: str) -> str:
    scale = 100.0 if main_metric != "loss" else 1.0
    lines = [
        "## Tuning",
        "",
        f"Peak learning rate per method, chosen by the final {main_metric} on a tuning split carved from the "
        "training data (held out of every client's partition, the same rows for every seed), one seed; the "
        "reported runs use the choice and are scored on the validation split. Grid: multiples of each "
        "method's own default, log-spaced; **bold** is the choice, † a choice at the grid's edge.",
        "",
    ]
    for dataset, methods in sorted(chosen.items()):
        lines += [f"**{dataset}**", "", "| method | tuning curve: lr → score | chosen lr |", "|---|---|---|"]
        for method, entry in sorted(methods.items()):
            best = entry["overrides"]["method.lr"]
            curve = ", ".join(
                (f"**{lr} → {score * scale:.1f}**" if float(lr) == best else f"{lr} → {score * scale:.1f}")
                for lr, score in entry["grid"].items()
            )
            lines.append(f"| `{method}` | {curve} | {best:g}{' †' if entry['at_grid_edge'] else ''} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import gather_records

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-paired")
    parser.add_argument("--results", type=Path, help="tuning results (default results/<preset>-tune)")
    parser.add_argument("--out", type=Path, help="report folder (default docs/results/<preset>)")
    args = parser.parse_args(argv)
    results = args.results or PROJECT_DIR / "results" / f"{args.preset}-tune"
    out = args.out or PROJECT_DIR / "docs" / "results" / args.preset
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "tuning-runs.jsonl"
    records = gather_records(results, stored)
    if not records:
        print(f"no completed tuning runs under {results} nor in {stored}", file=sys.stderr)
        return 1
    write_tuned(records, out)
    print(f"{len(records)} tuning runs → {out / 'tuned.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
