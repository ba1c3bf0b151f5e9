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
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from experiment_schema import higher_is_better

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


def write_tuned(records: list[dict[str, Any]], out: Path, complete: set[str] | None = None) -> dict[str, Any]:
    """``tuned.json`` and ``tuning.md`` in ``out`` from the tuning runs' records. ``complete``: the
    cells whose tuning jobs all ran; only their choices enter ``tuned.json``, and a choice already
    there is kept (the reported runs of a cell must not change learning rate midway)."""
    if not records:
        return {}
    main_metric = records[0]["main_metric"]
    chosen = choose(tuning_curves(records), main_metric, selectable(records, main_metric))
    path = out / "tuned.json"
    frozen = json.loads(path.read_text()) if path.is_file() else {}
    for cell, methods in chosen.items():
        for method, entry in methods.items():
            if (complete is None or cell in complete) and method not in frozen.get(cell, {}):
                frozen.setdefault(cell, {})[method] = entry
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(frozen, indent=2, sort_keys=True) + "\n")
    write_tuning_md(records, out)
    return frozen


def write_tuning_md(records: list[dict[str, Any]], out: Path) -> None:
    """``tuning.md``: every tuning curve, the choice in bold — the one ``tuned.json`` holds (what the
    reported runs use) where it holds one, else the best so far (marked pending)."""
    main_metric = records[0]["main_metric"]
    chosen = choose(tuning_curves(records), main_metric)  # pending: the best point so far
    path = out / "tuned.json"
    frozen = json.loads(path.read_text()) if path.is_file() else {}
    for cell, methods in chosen.items():
        for method, entry in methods.items():
            fixed = frozen.get(cell, {}).get(method)
            entry["pending"] = fixed is None
            if fixed is not None:
                entry["overrides"] = fixed["overrides"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.md").write_text(tuning_markdown(chosen, main_metric) + "\n")


def multiplier(record: dict[str, Any]) -> float:
    """A tuning job's multiple of its method's peak learning rate (``...-lr<mult>-s<seed>``)."""
    return float(str(record["job"]).rsplit("-lr", 1)[1].rsplit("-s", 1)[0])


def selectable(records: list[dict[str, Any]], main_metric: str) -> dict[str, dict[str, set[float]]]:
    """Per cell and method, the learning rates it may be chosen among: the multiples *every* method
    of the cell ran, widened one grid point at a time only where the best of them sits at the edge
    and the method ran the next multiple outward. A method tuned over a wider grid for another
    reason (FedIT and FFA-LoRA's two-decade curves for C2) gets no wider choice than the others
    unless its curve is still rising at the common grid's edge — as every method's would."""
    better = max if higher_is_better(main_metric) else min
    scores: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    lrs: dict[tuple[str, str, float], float] = {}
    for record in records:
        final = record["rounds"][-1]["metric"]
        if "-lr" in str(record.get("job", "")) and final is not None:
            cell, method, mult = tuning_cell(record), record["method"], multiplier(record)
            scores[cell][method][mult].append(float(final))
            lrs[cell, method, mult] = float(record["lr"])
    result: dict[str, dict[str, set[float]]] = {}
    for cell, methods in scores.items():
        shared = set.intersection(*(set(grid) for grid in methods.values()))
        result[cell] = {}
        for method, grid in methods.items():
            mean = {mult: float(np.mean(v)) for mult, v in grid.items()}
            allowed = set(shared) or set(mean)
            while True:
                best = better(allowed, key=lambda mult: mean[mult])
                outward = [m for m in mean if m > max(allowed)] if best == max(allowed) else []
                outward += [m for m in mean if m < min(allowed)] if best == min(allowed) else []
                step = min(outward, key=lambda m: abs(math.log(m / best)), default=None)
                if step is None or len(allowed) < 2:
                    break
                allowed.add(step)
            result[cell][method] = {lrs[cell, method, mult] for mult in allowed}
    return result


def choose(
    curves: dict[str, dict[str, dict[float, float]]],
    main_metric: str,
    allowed: dict[str, dict[str, set[float]]] | None = None,
) -> dict[str, Any]:
    """The best grid point per cell and method (among the ``allowed`` learning rates, when given),
    and where it sits in that grid (a choice at the grid's edge says it should have gone further)."""
    pick = max if higher_is_better(main_metric) else min
    chosen: dict[str, Any] = {}
    for dataset, methods in curves.items():
        for method, grid in methods.items():
            allow = (allowed or {}).get(dataset, {}).get(method) or set(grid)
            candidates = {lr: score for lr, score in grid.items() if any(math.isclose(lr, a) for a in allow)}
            best = pick(candidates, key=lambda lr: candidates[lr])
            edge = len(candidates) > 1 and best in (min(candidates), max(candidates))
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
            pending = " (pending: not all of the cell's tuning has run)" if entry.get("pending") else ""
            lines.append(
                f"| `{method}` | {curve} | {best:g}{' †' if entry['at_grid_edge'] else ''}{pending} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.result_folders import gather_records

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
    write_tuning_md(records, out)  # tuned.json is the sweep's to write, from complete cells
    print(f"{len(records)} tuning runs → {out / 'tuned.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
