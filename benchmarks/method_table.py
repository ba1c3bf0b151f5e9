"""The per-cell method table: run records grouped by dataset and setting, summarized into one row
per rule (final and best metric over seeds, gap to centralized, MB per client, wall time, peak
client memory, framework and wire overhead, chance level), and that table in Markdown."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.overheads import framework_overhead, framework_ratios, wire_overhead
from benchmarks.stats import Interval, mean_interval
from experiment_schema import higher_is_better
from strategies import RULES, Family

MB = 1e6
FAMILY_ORDER = tuple(Family)
#: Every registered rule, by family (baseline, LoRA, heterogeneous ranks, merged base, full), then name.
METHOD_ORDER = tuple(sorted(RULES, key=lambda name: (FAMILY_ORDER.index(RULES[name].family), name)))
#: Scored on the clients' own validation shares, not the common test set.
PERSONALISED = tuple(name for name in METHOD_ORDER if RULES[name].personalised)
LORA_FAMILY = tuple(name for name in METHOD_ORDER if RULES[name].lora_family)
#: Metrics shown in percent.
PERCENT_METRICS = ("accuracy", "f1", "matthews", "exact_match")

#: ``(dataset, setting) -> method -> runs`` (one run per seed).
RunsByCell = dict[tuple[str, str], dict[str, list[dict[str, Any]]]]


def method_rank(method: str) -> int:
    """The method's place in :data:`METHOD_ORDER` (unknown methods last)."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


@dataclass
class MethodRow:
    method: str
    seeds: int
    final: tuple[float, float]
    best: tuple[float, float]
    mb_down: float  # per client, whole run
    mb_up: float
    wall_s: float
    peak_mb: float | None
    framework: float | None  # mean over all federated rounds
    framework_later: float | None  # rounds 2+: without the client processes' start and model loading
    wire: float | None
    gap: float | None = None  # final mean minus the centralized final mean
    borrowed_from: str = ""  # the partition whose runs a partition-independent row repeats
    chance: float | None = None  # accuracy of always answering the evaluation set's commonest label
    eval_examples: int | None = None
    sampling_se: float = 0.0  # standard error of the final accuracy from the evaluation set's size
    per_seed: dict[int, float] = dataclasses.field(default_factory=dict)  # final metric by seed
    mb_per_seed: dict[int, float] = dataclasses.field(default_factory=dict)  # MB down + up per client

    @property
    def interval(self) -> Interval:
        return mean_interval(list(self.per_seed.values()))

    @property
    def noise(self) -> float:
        """What a difference of final means must exceed: the spread over seeds or, when larger, the
        evaluation set's own sampling error."""
        return max(self.final[1], self.sampling_se)

    @property
    def at_chance(self) -> bool:
        """The final mean is within two standard errors of the majority-class rate."""
        return self.chance is not None and self.final[0] - self.chance < 2 * self.sampling_se


#: ``(dataset, setting) -> rows``, one row per method.
MethodTable = dict[tuple[str, str], list[MethodRow]]


def _bytes_per_client(record: dict[str, Any], key: str) -> float:
    """The run's ``key`` bytes (``bytes_down`` or ``bytes_up``), all rounds, ÷ its clients."""
    return sum(row[key] or 0 for row in record["rounds"]) / record["num_clients"]


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _best_metrics(records: list[dict[str, Any]], main_metric: str) -> list[float]:
    """Per run, its best scored round's main metric."""
    pick = max if higher_is_better(main_metric) else min
    return [pick(row["metric"] for row in r["rounds"] if row["metric"] is not None) for r in records]


def _peak_memory(records: list[dict[str, Any]]) -> float | None:
    """The largest peak memory of any client round of the runs."""
    peaks = [
        row["peak_client_memory_mb"]
        for r in records
        for row in r["rounds"]
        if row.get("peak_client_memory_mb")
    ]
    return max(peaks) if peaks else None


def _chance_level(
    records: list[dict[str, Any]], main_metric: str, final_mean: float
) -> tuple[float | None, int | None, float]:
    """The majority-class rate, the evaluation examples and the final accuracy's sampling standard
    error, where the runs recorded a chance level of an accuracy."""
    known = next((r["chance"] for r in records if r.get("chance")), None)
    if not known or main_metric != "accuracy":
        return None, None, 0.0
    examples = known["eval_examples"]
    return known["majority_rate"], examples, math.sqrt(final_mean * (1 - final_mean) / examples)


def summarize(records: list[dict[str, Any]], parallel: int) -> MethodRow:
    """One method's runs of one cell (one per seed) → its table row."""
    main = records[0]["main_metric"]
    finals = [r["rounds"][-1]["metric"] for r in records]
    down = [_bytes_per_client(r, "bytes_down") for r in records]
    up = [_bytes_per_client(r, "bytes_up") for r in records]
    framework = [x for r in records if (x := framework_overhead(r, parallel)) is not None]
    later = [float(np.mean(rs[1:])) for r in records if len(rs := framework_ratios(r, parallel)) > 1]
    wire = [x for r in records if (x := wire_overhead(r)) is not None]
    final = mean_std(finals)
    chance, examples, sampling_se = _chance_level(records, main, final[0])
    return MethodRow(
        method=records[0]["method"],
        seeds=len(records),
        final=final,
        best=mean_std(_best_metrics(records, main)),
        mb_down=float(np.mean(down)) / MB,
        mb_up=float(np.mean(up)) / MB,
        wall_s=float(np.mean([r["wall_seconds"] for r in records])),
        peak_mb=_peak_memory(records),
        framework=_mean_or_none(framework),
        framework_later=_mean_or_none(later),
        wire=_mean_or_none(wire),
        chance=chance,
        eval_examples=examples,
        sampling_se=sampling_se,
        per_seed={int(r["seed"]): f for r, f in zip(records, finals, strict=True)},
        mb_per_seed={int(r["seed"]): (d + u) / MB for r, d, u in zip(records, down, up, strict=True)},
    )


def grouped(records: list[dict[str, Any]]) -> RunsByCell:
    """``(dataset, setting) -> method -> runs`` (one run per seed); a setting is a sweep's named
    cell (a partition with its options, DP, ...), the partition for records without one."""
    groups: RunsByCell = defaultdict(lambda: defaultdict(list))
    for record in records:
        cell = (record["dataset"], record.get("setting") or record["partition"])
        groups[cell][record["method"]].append(record)
    return groups


def shared_centralized(groups: RunsByCell, dataset: str) -> tuple[str, list[dict[str, Any]]] | None:
    """The centralized runs of ``dataset`` and their partition: training on the union of the data,
    they hold for every partition."""
    found = [
        (p, m["centralized"]) for (d, p), m in sorted(groups.items()) if d == dataset and "centralized" in m
    ]
    return found[0] if found else None


def method_rows(groups: RunsByCell, parallel: int) -> MethodTable:
    """Per cell, a row per method in :data:`METHOD_ORDER`, with the gap to the centralized row (the
    cell's own, else the dataset's from another partition, repeated at the top)."""
    result = {}
    for key, methods in sorted(groups.items()):
        rows = [
            summarize(runs, parallel)
            for _, runs in sorted(methods.items(), key=lambda kv: method_rank(kv[0]))
        ]
        central = next((r for r in rows if r.method == "centralized"), None)
        borrowed = None if central else shared_centralized(groups, key[0])
        if borrowed is not None:
            central = dataclasses.replace(summarize(borrowed[1], parallel), borrowed_from=borrowed[0])
            rows.insert(0, central)
        for row in rows:
            row.gap = row.final[0] - central.final[0] if central is not None else None
        result[key] = rows
    return result


def _pm(value: tuple[float, float], scale: float) -> str:
    return f"{value[0] * scale:.1f} ± {value[1] * scale:.1f}"


def _opt(value: float | None, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _gap_cell(row: MethodRow, scale: float) -> str:
    if row.gap is None or row.method == "centralized":
        return "—"
    if row.method in PERSONALISED:
        return "not comparable"
    return f"{row.gap * scale:+.1f}"


def _table_line(row: MethodRow, scale: float) -> str:
    name = f"`{row.method}`" + (f" (the {row.borrowed_from} runs)" if row.borrowed_from else "")
    return (
        f"| {name} | {row.seeds} | {_pm(row.final, scale)}{' °' if row.at_chance else ''} "
        f"| {_pm(row.best, scale)} | {_gap_cell(row, scale)} "
        f"| {row.mb_down:.1f} / {row.mb_up:.1f} | {row.wall_s:.0f} | {_opt(row.peak_mb, '.0f')} "
        f"| {_opt(row.framework, '.2f')} / {_opt(row.framework_later, '.2f')} | {_opt(row.wire, '.3f')} |"
    )


def _chance_note(rows: list[MethodRow], scale: float) -> list[str]:
    """What always answering the commonest label scores (the usual evaluation set, and the rows
    scored on another), and what ° marks; nothing where no row knows its chance level."""
    scored = [r for r in rows if r.chance is not None]
    if not scored:
        return []
    usual = Counter((r.chance, r.eval_examples) for r in scored).most_common(1)[0][0]
    assert usual[0] is not None
    others = [
        f"`{r.method}`: {(r.chance or 0.0) * scale:.1f} % of its clients' own shares"
        for r in scored
        if (r.chance, r.eval_examples) != usual
    ]
    return [
        "",
        f"Always answering the commonest label scores {usual[0] * scale:.1f} % of the {usual[1]} "
        f"evaluation examples{' (' + '; '.join(others) + ')' if others else ''}; ° marks a final mean "
        "within two standard errors of that: not distinguishable from a model that learned nothing.",
    ]


def markdown_table(rows: list[MethodRow], metric: str) -> str:
    """One cell's rows as a Markdown table, with the chance level below it."""
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    unit = " (%)" if scale == 100 else ""
    lines = [
        f"| method | seeds | final {metric}{unit} | best{unit} | gap to centralized (pp) "
        "| MB down / up per client | wall (s) | peak client MB | framework overhead: all rounds / rounds 2+ "
        "| wire overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_line(row, scale) for row in rows]
    lines += _chance_note(rows, scale)
    return "\n".join(lines)
