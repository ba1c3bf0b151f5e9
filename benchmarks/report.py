"""Benchmark report: a results folder (or the committed run records) → a Markdown table per dataset
and partition (final and best metric, mean ± std over seeds, gap to centralized, MB per client,
wall time, peak client memory, framework and wire overhead), PNG plots (metric vs round, metric vs
cumulative MB per client), and which of the papers' claims held on these runs.

    python -m benchmarks.report --preset cpu-paired     # docs/results/cpu-paired/runs.jsonl → report.md

Run folders under ``--results`` are collected into ``<out>/runs.jsonl`` (merged with the records
already there), and the report is built from that file alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.claims import claims_section
from benchmarks.pairing import admit, provenance_lines
from benchmarks.results import merge_records, read_records, run_record, same_run_code, write_records
from benchmarks.stats import Interval, Verdict, advise, mean_interval, paired_difference, verdict
from experiment_schema import higher_is_better
from strategies import RULES, Family

PROJECT_DIR = Path(__file__).resolve().parents[1]
MB = 1e6
FAMILY_ORDER = tuple(Family)
PALETTE = (
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
)  # fmt: skip  # one fixed colour per method (by its place in METHOD_ORDER), the same in every plot
#: Every registered rule, by family (baseline, LoRA, heterogeneous ranks, merged base, full), then name.
METHOD_ORDER = tuple(sorted(RULES, key=lambda name: (FAMILY_ORDER.index(RULES[name].family), name)))
#: Scored on the clients' own validation shares, not the common test set.
PERSONALISED = tuple(name for name in METHOD_ORDER if RULES[name].personalised)
LORA_FAMILY = tuple(name for name in METHOD_ORDER if RULES[name].lora_family)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def makespan(durations: Sequence[float], workers: int) -> float:
    """The least time ``workers`` need for jobs of ``durations`` when each next-longest job goes to
    the first free worker (LPT scheduling: within 4/3 of the optimum, exact for equal jobs)."""
    free = [0.0] * max(workers, 1)
    for duration in sorted(durations, reverse=True):
        free[free.index(min(free))] += duration
    return max(free)


def framework_overhead(record: dict[str, Any], parallel: int) -> float | None:
    """Mean over rounds of :func:`framework_ratios`."""
    ratios = framework_ratios(record, parallel)
    return float(np.mean(ratios)) if ratios else None


def framework_ratios(record: dict[str, Any], parallel: int) -> list[float]:
    """Per federated round, the training phase's wall time over the least it could take: the
    clients' training times scheduled on ``parallel`` workers (or, for records without per-client
    times, the larger of the slowest client and the summed time ÷ ``parallel``)."""
    ratios = []
    for row in record["rounds"][1:]:
        slowest, wall = row.get("slowest_client_seconds"), row.get("train_phase_seconds")
        if not slowest or not wall or not row.get("clients_aggregated"):
            continue  # no federated round (the centralized baseline trains in the server)
        if row.get("client_seconds"):
            ideal = makespan(row["client_seconds"], parallel)
        else:
            ideal = max(slowest, (row.get("client_seconds_total") or slowest) / parallel)
        ratios.append(wall / ideal)
    return ratios


def wire_overhead(record: dict[str, Any]) -> float | None:
    """Bytes the messages carried (serialized records) over the raw bytes of the arrays the method
    must move."""
    sent = sum((r.get("bytes_down") or 0) + (r.get("bytes_up") or 0) for r in record["rounds"])
    minimal = sum(
        (r.get("payload_bytes_down") or 0) + (r.get("payload_bytes_up") or 0) for r in record["rounds"]
    )
    return sent / minimal if minimal else None


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


def summarize(records: list[dict[str, Any]], parallel: int) -> MethodRow:
    main = records[0]["main_metric"]
    pick = max if higher_is_better(main) else min
    finals = [r["rounds"][-1]["metric"] for r in records]
    bests = [pick(row["metric"] for row in r["rounds"] if row["metric"] is not None) for r in records]
    per_client = [r["num_clients"] for r in records]
    down = [
        sum(row["bytes_down"] or 0 for row in r["rounds"]) / n
        for r, n in zip(records, per_client, strict=True)
    ]
    up = [
        sum(row["bytes_up"] or 0 for row in r["rounds"]) / n for r, n in zip(records, per_client, strict=True)
    ]
    peaks = [
        row["peak_client_memory_mb"]
        for r in records
        for row in r["rounds"]
        if row.get("peak_client_memory_mb")
    ]
    framework = [x for r in records if (x := framework_overhead(r, parallel)) is not None]
    later = [float(np.mean(rs[1:])) for r in records if len(rs := framework_ratios(r, parallel)) > 1]
    wire = [x for r in records if (x := wire_overhead(r)) is not None]
    final = mean_std(finals)
    known = next((r["chance"] for r in records if r.get("chance")), None)
    chance, examples, sampling_se = None, None, 0.0
    if known and main == "accuracy":
        examples, chance = known["eval_examples"], known["majority_rate"]
        sampling_se = math.sqrt(final[0] * (1 - final[0]) / examples)
    return MethodRow(
        method=records[0]["method"],
        seeds=len(records),
        final=final,
        best=mean_std(bests),
        mb_down=float(np.mean(down)) / MB,
        mb_up=float(np.mean(up)) / MB,
        wall_s=float(np.mean([r["wall_seconds"] for r in records])),
        peak_mb=max(peaks) if peaks else None,
        framework=float(np.mean(framework)) if framework else None,
        framework_later=float(np.mean(later)) if later else None,
        wire=float(np.mean(wire)) if wire else None,
        chance=chance,
        eval_examples=examples,
        sampling_se=sampling_se,
        per_seed={int(r["seed"]): f for r, f in zip(records, finals, strict=True)},
        mb_per_seed={int(r["seed"]): (d + u) / MB for r, d, u in zip(records, down, up, strict=True)},
    )


def grouped(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """``(dataset, setting) -> method -> runs`` (one run per seed); a setting is a sweep's named
    cell (a partition with its options, DP, ...), the partition for records without one."""
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        cell = (record["dataset"], record.get("setting") or record["partition"])
        groups[cell][record["method"]].append(record)
    return groups


def shared_centralized(
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]], dataset: str
) -> tuple[str, list[dict[str, Any]]] | None:
    """The centralized runs of ``dataset`` and their partition: training on the union of the data,
    they hold for every partition."""
    found = [
        (p, m["centralized"]) for (d, p), m in sorted(groups.items()) if d == dataset and "centralized" in m
    ]
    return found[0] if found else None


def method_rows(
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]], parallel: int
) -> dict[tuple[str, str], list[MethodRow]]:
    result = {}
    for key, methods in sorted(groups.items()):
        rows = [
            summarize(runs, parallel) for _, runs in sorted(methods.items(), key=lambda kv: _order(kv[0]))
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


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _pm(value: tuple[float, float], scale: float) -> str:
    return f"{value[0] * scale:.1f} ± {value[1] * scale:.1f}"


def _opt(value: float | None, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown_table(rows: list[MethodRow], metric: str) -> str:
    scale = 100.0 if metric in ("accuracy", "f1", "matthews", "exact_match") else 1.0
    unit = " (%)" if scale == 100 else ""
    lines = [
        f"| method | seeds | final {metric}{unit} | best{unit} | gap to centralized (pp) "
        "| MB down / up per client | wall (s) | peak client MB | framework overhead: all rounds / rounds 2+ "
        "| wire overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gap = (
            "—"
            if row.gap is None or row.method == "centralized"
            else "not comparable"
            if row.method in PERSONALISED
            else f"{row.gap * scale:+.1f}"
        )
        name = f"`{row.method}`" + (f" (the {row.borrowed_from} runs)" if row.borrowed_from else "")
        lines.append(
            f"| {name} | {row.seeds} | {_pm(row.final, scale)}{' °' if row.at_chance else ''} "
            f"| {_pm(row.best, scale)} | {gap} "
            f"| {row.mb_down:.1f} / {row.mb_up:.1f} | {row.wall_s:.0f} | {_opt(row.peak_mb, '.0f')} "
            f"| {_opt(row.framework, '.2f')} / {_opt(row.framework_later, '.2f')} | {_opt(row.wire, '.3f')} |"
        )
    scored = [r for r in rows if r.chance is not None]
    if scored:
        usual = Counter((r.chance, r.eval_examples) for r in scored).most_common(1)[0][0]
        assert usual[0] is not None
        others = [
            f"`{r.method}`: {(r.chance or 0.0) * scale:.1f} % of its clients' own shares"
            for r in scored
            if (r.chance, r.eval_examples) != usual
        ]
        lines += [
            "",
            f"Always answering the commonest label scores {usual[0] * scale:.1f} % of the {usual[1]} "
            f"evaluation examples{' (' + '; '.join(others) + ')' if others else ''}; ° marks a final mean "
            "within two standard errors of that: not distinguishable from a model that learned nothing.",
        ]
    return "\n".join(lines)


def transport_ratios(record: dict[str, Any], parallel: int) -> list[float]:
    """Per federated round that recorded them, the training phase's wall time over the clients'
    whole train handlers (model set-up, data preparation, training, serialization) scheduled on
    ``parallel`` workers: what is left is Flower's messaging and scheduling."""
    return [
        row["train_phase_seconds"] / makespan(row["client_handler_seconds"], parallel)
        for row in record["rounds"][1:]
        if row.get("client_handler_seconds") and row.get("train_phase_seconds")
    ]


def efficiency_table(records: list[dict[str, Any]], parallel: int) -> str:
    """One line per federated run: framework overhead in the first round (which also starts the
    client processes and loads their models) and over the later rounds, and the wire overhead."""
    lines = [
        "| run | rounds | framework overhead: round 1 | rounds 2+: mean (max) | MB per round (wire / arrays) "
        "| of which Flower: rounds 2+ mean (max) | wire overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in sorted(
        records, key=lambda r: (r["dataset"], r["partition"], _order(r["method"]), r["seed"])
    ):
        ratios = framework_ratios(record, parallel)
        wire = wire_overhead(record)
        if not ratios or wire is None:
            continue
        rounds = [row for row in record["rounds"][1:] if row.get("clients_aggregated")]
        sent = np.mean([(row["bytes_down"] or 0) + (row["bytes_up"] or 0) for row in rounds]) / MB
        payload = (
            np.mean(
                [(row.get("payload_bytes_down") or 0) + (row.get("payload_bytes_up") or 0) for row in rounds]
            )
            / MB
        )
        later = f"{np.mean(ratios[1:]):.2f} ({max(ratios[1:]):.2f})" if len(ratios) > 1 else "—"
        transport = transport_ratios(record, parallel)[1:]
        flower = f"{np.mean(transport):.2f} ({max(transport):.2f})" if transport else "not recorded"
        lines.append(
            f"| `{record['job']}` | {len(rounds)} | {ratios[0]:.2f} | {later} | {sent:.2f} / {payload:.2f} "
            f"| {flower} | {wire:.3f} |"
        )
    return "\n".join(lines)


# A claim's verdict on one table, with the numbers in words; None if not run. With two or more seeds
# both sides ran, the paired interval of the difference decides (held / did not hold only when it
# excludes zero); a single seed falls back to the noise band. Both sides at chance: inconclusive.
Outcome = Verdict | None  # None: both sides score like a model that learned nothing
ClaimResult = tuple[Outcome, str] | None


@dataclass
class Claim:
    paper: str
    claim: str
    test: Callable[[dict[str, MethodRow]], ClaimResult]


@dataclass
class Comparison:
    diff: float  # a's final mean minus b's
    noise: float  # the larger of the two rows' noise levels
    words: str
    both_at_chance: bool
    paired: Interval | None = None  # a − b over the seeds both ran

    def verdict(self, held_in_noise: bool, extra: str = "", required: bool = True) -> ClaimResult:
        """The outcome: by the paired interval when there is one (``held_in_noise`` is the
        single-seed rule), and never held when a ``required`` side condition fails."""
        if self.both_at_chance:
            return None, self.words + extra
        if self.paired is not None and self.paired.n >= 2:
            outcome = verdict(self.paired)
        else:
            if held_in_noise and self.diff < 0:
                # "At least as good" that rests only on the noise band: say so rather than imply a tie.
                extra += "; lower, but within the noise"
            outcome = Verdict.HELD if held_in_noise else Verdict.DID_NOT_HOLD
        if not required:
            outcome = Verdict.DID_NOT_HOLD
        return outcome, self.words + extra


def _compare(rows: dict[str, MethodRow], a: str, b: str) -> Comparison | None:
    if a not in rows or b not in rows:
        return None
    ra, rb = rows[a], rows[b]
    noise = max(ra.noise, rb.noise)
    paired = paired_difference(ra.per_seed, rb.per_seed)
    words = f"{a} {ra.final[0] * 100:.1f} vs {b} {rb.final[0] * 100:.1f}"
    if paired is not None and paired.n >= 2:
        words += f": paired difference {paired.bounds()} pp over {paired.n} seeds"
    else:
        words += f" (± {noise * 100:.1f})"
    return Comparison(ra.final[0] - rb.final[0], noise, words, ra.at_chance and rb.at_chance, paired)


def _at_least(a: str, b: str) -> Callable[[dict[str, MethodRow]], ClaimResult]:
    def test(rows: dict[str, MethodRow]) -> ClaimResult:
        found = _compare(rows, a, b)
        return None if found is None else found.verdict(found.diff >= -found.noise)

    return test


def _half_upload(rows: dict[str, MethodRow]) -> ClaimResult:
    found = _compare(rows, "ffa_lora", "fedit")
    if found is None:
        return None
    ratio = rows["ffa_lora"].mb_up / rows["fedit"].mb_up
    return found.verdict(found.diff >= -found.noise, f"; upload ratio {ratio:.2f}", required=ratio < 0.6)


def _beats_lora_family(method: str) -> Callable[[dict[str, MethodRow]], ClaimResult]:
    def test(rows: dict[str, MethodRow]) -> ClaimResult:
        family = [m for m in LORA_FAMILY if m in rows]
        if method not in rows or not family:
            return None
        best = max(family, key=lambda m: rows[m].final[0])
        found = _compare(rows, method, best)
        assert found is not None
        return found.verdict(found.diff > found.noise, " (best of the LoRA family)")

    return test


def _upper_bound(rows: dict[str, MethodRow]) -> ClaimResult:
    others = [m for m in rows if m != "centralized" and m not in PERSONALISED]
    if "centralized" not in rows or not others:
        return None
    found = _compare(rows, "centralized", max(others, key=lambda m: rows[m].final[0]))
    assert found is not None
    return found.verdict(found.diff >= -found.noise)


CLAIMS = (
    Claim("FFA-LoRA", "freezing A matches FedIT with half the upload", _half_upload),
    Claim(
        "FedEx-LoRA",
        "exact aggregation is at least as good as FedIT's inexact mean",
        _at_least("fedex_lora", "fedit"),
    ),
    Claim("FLoRA", "stacking (exact, any ranks) is at least as good as FedIT", _at_least("flora", "fedit")),
    Claim(
        "LoRA-FAIR",
        "the server-side correction is at least as good as FedIT",
        _at_least("lora_fair", "fedit"),
    ),
    Claim(
        "FlexLoRA",
        "heterogeneous ranks via SVD redistribution are at least as good as FedIT",
        _at_least("flexlora", "fedit"),
    ),
    Claim("HLoRA", "the QR-compact SVD gives FlexLoRA's result", _at_least("hlora", "flexlora")),
    Claim(
        "FedSVD",
        "re-factoring B̄A by its SVD is at least as good as FFA-LoRA",
        _at_least("fedsvd", "ffa_lora"),
    ),
    Claim("RoLoRA", "alternating A and B is at least as good as FFA-LoRA", _at_least("rolora", "ffa_lora")),
    Claim("RoLoRA", "... and as FedIT", _at_least("rolora", "fedit")),
    Claim(
        "Fed-SB",
        "training only R is at least as good as FedIT, at a fraction of the upload",
        _at_least("fed_sb", "fedit"),
    ),
    Claim(
        "Why Gradient Subspace?",
        "direct weight averaging (full fine-tuning) beats the LoRA family",
        _beats_lora_family("full"),
    ),
    Claim(
        "Why Gradient Subspace?", "... and with GaLore as the local optimizer", _beats_lora_family("galore")
    ),
    Claim(
        "(upper bound)",
        "centralized training on the union is at least as good as any federated rule",
        _upper_bound,
    ),
)


def claims_text(table: dict[tuple[str, str], list[MethodRow]]) -> list[str]:
    lines = []
    for claim in CLAIMS:
        verdicts = []
        for (dataset, partition), rows in table.items():
            outcome = claim.test({r.method: r for r in rows})
            if outcome is not None:
                held, words = outcome
                said = {
                    Verdict.HELD: "held",
                    Verdict.DID_NOT_HOLD: "**did not hold**",
                    Verdict.NOT_RESOLVED: "not resolved",
                    None: "inconclusive (both at chance)",
                }[held]
                verdicts.append(f"{dataset}/{partition}: {said} — {words}")
        if verdicts:
            lines.append(f"- **{claim.paper}**: {claim.claim}.")
            lines.extend(f"  - {v}" for v in verdicts)
    for method in PERSONALISED:
        found = [(key, r) for key, rows in table.items() for r in rows if r.method == method]
        if not found:
            continue
        lines.append(
            f"- `{method}` is scored on each client's own validation share (personalised), so its figure "
            "is not comparable with the common test set of the other rules; against always answering "
            "each client's commonest label:"
        )
        for (dataset, partition), row in found:
            if row.chance is None:
                continue
            gain = row.final[0] - row.chance
            lines.append(
                f"  - {dataset}/{partition}: {row.final[0] * 100:.1f} vs {row.chance * 100:.1f} "
                f"(± {row.noise * 100:.1f}): "
                + ("no better than that" if row.at_chance else f"{gain * 100:+.1f} pp of learning beyond it")
            )
    return lines


def _contenders(rows: list[MethodRow]) -> list[MethodRow]:
    """The federated rules scored on the common evaluation set."""
    return [r for r in rows if r.method != "centralized" and r.method not in PERSONALISED]


def paired_table(rows: list[MethodRow]) -> str:
    """Per rule: the final metric's mean ± 95 % interval over seeds, and its paired difference to
    FedIT and to the best LoRA rule (best by mean, other than itself), with the verdict."""
    contenders = _contenders(rows)
    by_name = {r.method: r for r in contenders}
    lora = [r for r in contenders if r.method in LORA_FAMILY]
    lines = [
        "| method | seeds | final (mean ± 95 % CI) | − `fedit` (pp, paired, 95 % CI) | − best LoRA rule |",
        "|---|---|---|---|---|",
    ]

    def against(row: MethodRow, other: MethodRow | None) -> str:
        if other is None or other is row:
            return "—"
        found = paired_difference(row.per_seed, other.per_seed)
        if found is None:
            return "no shared seeds"
        return f"{found.bounds()} {verdict(found).value}" + (
            f" (`{other.method}`)" if other.method != "fedit" else ""
        )

    for row in contenders:
        best_other = max((r for r in lora if r is not row), key=lambda r: r.final[0], default=None)
        lines.append(
            f"| `{row.method}` | {row.seeds} | {row.interval.points()} "
            f"| {against(row, by_name.get('fedit'))} | {against(row, best_other)} |"
        )
    return "\n".join(lines)


def decision_guide(table: dict[tuple[str, str], list[MethodRow]]) -> list[str]:
    """Per dataset and setting: which rule to use for accuracy (and by how much it leads the
    runner-up, paired) and, for tight bandwidth, the cheapest rule not resolved below the best."""
    lines = []
    for (dataset, setting), rows in table.items():
        contenders = [r for r in _contenders(rows) if r.per_seed]
        if not contenders:
            continue
        cell = f"{dataset} / {setting}"
        if all(r.at_chance for r in contenders):
            lines.append(f"- **{cell}**: every rule is at chance; these runs cannot guide a choice.")
            continue
        advice = advise(cell, {r.method: r.per_seed for r in contenders})
        assert advice is not None
        lines.append(f"- {advice.text()}")
        best = next(r for r in contenders if r.method == advice.best)
        close = [
            r
            for r in contenders
            if r is best or not ((d := paired_difference(r.per_seed, best.per_seed)) and d.resolved)
        ]
        cheapest = min(close, key=lambda r: r.mb_down + r.mb_up)
        if cheapest is not best:
            sent, most = cheapest.mb_down + cheapest.mb_up, best.mb_down + best.mb_up
            lines.append(
                f"  - tight bandwidth: `{cheapest.method}` sends {sent:.1f} MB per client (vs {most:.1f} MB "
                f"for `{best.method}`) at {cheapest.interval.points()} %, not resolved below the best."
            )
        else:
            lines.append(
                f"  - tight bandwidth: `{best.method}` is also the cheapest of the rules that match it."
            )
    return lines


def plot(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Per dataset and partition: metric vs round, and metric vs cumulative MB per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = grouped(records)
    for (dataset, partition), methods in sorted(groups.items()):
        fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
        shared = None if "centralized" in methods else shared_centralized(groups, dataset)
        curves = {**methods, **({"centralized": shared[1]} if shared else {})}
        for method, runs in sorted(curves.items(), key=lambda kv: _order(kv[0])):
            length = min(len(r["rounds"]) for r in runs)
            metric = np.mean(
                [
                    [np.nan if row["metric"] is None else row["metric"] for row in r["rounds"][:length]]
                    for r in runs
                ],
                axis=0,
            )
            scored = ~np.isnan(metric)  # evaluation.every > 1 leaves rounds unscored
            per_client = [
                np.cumsum([(row["bytes_down"] or 0) + (row["bytes_up"] or 0) for row in r["rounds"][:length]])
                / r["num_clients"]
                / MB
                for r in runs
            ]
            rounds = np.asarray([row["round"] for row in runs[0]["rounds"][:length]])
            style = {"label": method, "marker": ".", "color": PALETTE[_order(method) % len(PALETTE)]}
            if method == "centralized":
                by_round.plot(rounds[scored], metric[scored], "--", **style)
                continue
            by_round.plot(rounds[scored], metric[scored], "-", **style)
            sent, from_one = np.mean(per_client, axis=0), scored & (rounds >= 1)
            by_bytes.plot(sent[from_one], metric[from_one], "-", **style)
        main = records[0]["main_metric"]
        by_round.set(xlabel="round", ylabel=main, title=f"{dataset} / {partition}: {main} vs round")
        by_bytes.set(xlabel="MB communicated per client (down + up, cumulative)", ylabel=main, xscale="log")
        by_bytes.set_title(f"{dataset} / {partition}: {main} vs communication")
        for axes in (by_round, by_bytes):
            if axes.get_lines():
                axes.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"{dataset}-{partition}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(
    all_records: list[dict[str, Any]],
    out: Path,
    preset: str,
    parallel: int,
    tuning: list[dict[str, Any]] | None = None,
    fingerprints: list[dict[str, Any]] | None = None,
    cuts: dict[str, str] | None = None,
) -> Path:
    """The report of the runs that may be paired (``benchmarks.pairing``); the others are named.
    ``cuts``: the cells the preset leaves out, with the reason (its ``cut`` key)."""
    out.mkdir(parents=True, exist_ok=True)
    admission = admit(
        all_records, fingerprints or [], same_code=lambda a, b: same_run_code(PROJECT_DIR, a, b)
    )
    records = admission.kept
    table = method_rows(grouped(records), parallel)
    commits = sorted({r.get("commit") or "unknown" for r in records})
    lines = [
        f"# Benchmark report: `{preset}`",
        "",
        f"{len(records)} runs; code commit(s) that produced them: {', '.join(f'`{c}`' for c in commits)}. "
        f"Generated by `python -m benchmarks.report --preset {preset}` from `runs.jsonl` beside this file.",
        "",
        "Columns: final and best main metric over rounds (mean ± sample std over seeds); gap of the final "
        "mean to the centralized baseline in percentage points; MB sent down / up per client over the whole "
        "run (all clients' bytes ÷ the number of clients); wall time of the run; the largest peak memory of "
        f"a client round; **framework overhead** = training-phase wall time ÷ the least time the clients' "
        f"own training takes on {parallel} workers (longest-first scheduling), mean over all federated "
        "rounds and over rounds 2+ (round 1 also starts the client processes and loads their models) "
        "(target ≤ 1.15); "
        "**wire overhead** = "
        "bytes of the serialized array records ÷ raw bytes of the arrays the method must move "
        "(target ≤ 1.05).",
        "",
    ]
    lines += ["## Provenance and pairing", "", *provenance_lines(admission), ""]
    lines += [*claims_section(records, tuning or [], cuts), ""]
    lines += compute_section(all_records, tuning or [], fingerprints or [])
    guide = decision_guide(table)
    if guide:
        lines += [
            "## Decision guide",
            "",
            "Generated from the numbers below: a seed fixes the partition, the client draws and the data "
            "order for every rule of a cell, so rules are compared by their paired per-seed differences "
            "(t interval, 95 %); a lead whose interval spans zero is *not resolved*.",
            "",
            *guide,
            "",
        ]
    tuning_md = out / "tuning.md"
    if tuning_md.is_file():
        lines += [tuning_md.read_text().strip(), ""]
    for (dataset, partition), rows in table.items():
        metric = next(r for r in records if r["dataset"] == dataset)["main_metric"]
        lines += [f"## {dataset} / {partition}", "", markdown_table(rows, metric), ""]
        if any(r.seeds >= 2 for r in rows):
            lines += ["Paired comparison:", "", paired_table(rows), ""]
        lrs = {
            r["method"]: r.get("lr")
            for r in records
            if (r["dataset"], r.get("setting") or r["partition"]) == (dataset, partition)
        }
        if any(lrs.values()):
            shown = ", ".join(
                f"`{m}` {lr:g}" for m, lr in sorted(lrs.items(), key=lambda kv: _order(kv[0])) if lr
            )
            lines += [f"Peak learning rates: {shown}.", ""]
        lines += [f"![{dataset} {partition}]({dataset}-{partition}.png)", ""]
    lines += [
        "## Claims per cell, one comparison each",
        "",
        'Single comparisons in every cell of this report, under the older rule ("at least as good" holds '
        "unless the interval lies below zero); the seed papers' claims are decided above (C1–C4), over "
        "their named cells and with their own rules. Where both sides ran two or more seeds, the paired "
        "difference of their final metrics decides "
        "(95 % t interval over the shared seeds): held or did not hold only when the interval excludes "
        "zero, else not resolved. A single seed counts a difference of final means only beyond the noise "
        "(± below): the standard error an accuracy has on this many evaluation examples. Where both sides "
        "are at chance (°), the runs say nothing about the claim.",
        "",
        *claims_text(table),
        "",
    ]
    lines += [
        "## Efficiency per run",
        "",
        f"Framework overhead per round as above ({parallel} workers); it counts everything in the training "
        "phase but the clients' training loops, so also our client's own preparation (a model built for a "
        "rank or a partition tokenized when a worker first meets it). *Of which Flower*: the same wall "
        "time over the clients' whole train handlers (preparation, training, serialization), i.e. Flower's "
        "messaging and scheduling alone (not recorded by runs made before the handler time was). "
        "MB per round: down + up, all clients, as serialized / as raw arrays.",
        "",
        efficiency_table(records, parallel),
        "",
    ]
    plot(records, out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def compute_section(
    records: list[dict[str, Any]], tuning: list[dict[str, Any]], fingerprints: list[dict[str, Any]]
) -> list[str]:
    """The measured compute of the preset so far: every recorded job's wall time (sweep records
    carry it with its phases; older records only the run's own wall time), by stage and cell."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for stage, runs in (("report", records), ("tune", tuning), ("fingerprint", fingerprints)):
        for r in runs:
            groups[
                (stage, str(r.get("model") or ""), r["dataset"], r.get("setting") or r["partition"])
            ].append(r)
    if not groups:
        return []
    lines = [
        "## Measured compute",
        "",
        "Sized from these figures: `python -m launch.sweep --preset <preset> --plan` estimates every job "
        "left from them.",
        "",
        "Wall time of every recorded job on this preset's machine (the sweep's own clock, from `flwr run` "
        "to the run's finished status; phases from the run's summary and rounds, medians per job).",
        "",
        "| stage | model | dataset | setting | jobs | minutes | median s/job | submit | server start | "
        "set-up | train (of which round-1 cold start) | evaluate | finish |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for key, runs in sorted(groups.items()):
        seconds = [float(r.get("job_seconds") or r["wall_seconds"]) for r in runs]
        total += sum(seconds)
        phases = [r.get("phases") or {} for r in runs]

        def median(name: str, phases: list[dict[str, float]] = phases) -> str:
            values = [p[name] for p in phases if name in p]
            return f"{np.median(values):.1f}" if values else "—"

        lines.append(
            f"| {' | '.join(key)} | {len(runs)} | {sum(seconds) / 60:.0f} | {np.median(seconds):.0f} | "
            f"{median('submit')} | {median('server_start')} | {median('server_setup')} | "
            f"{median('train')} ({median('first_round_cold_start')}) | {median('evaluate')} | "
            f"{median('finish')} |"
        )
    lines += [
        "",
        f"Total: {total / 3600:.2f} h of measured compute over {sum(map(len, groups.values()))} jobs.",
        "",
    ]
    return lines


def collect(results: Path) -> list[dict[str, Any]]:
    """Records of the completed runs under ``results/<job>/<run folder>/`` that the sweep marked
    with the commit it ran them at (``sweep-commit``): reported jobs only (tuning jobs,
    ``...-lr<mult>-s<seed>``, keep their own records), no attempt set aside, no fingerprint re-run."""
    records = []
    for job_dir in sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")):
        seed_text = job_dir.name.rsplit("-s", 1)[-1]
        if TUNING_JOB.search(job_dir.name) or "-s" not in job_dir.name or not seed_text.isdigit():
            continue
        seed = int(seed_text)
        for run_dir in sorted(job_dir.iterdir()):
            marker = run_dir / "sweep-commit"
            if run_dir.suffix in (".interrupted", ".unrecorded") or not marker.is_file():
                continue
            record = run_record(run_dir, job_dir.name, seed, marker.read_text().strip())
            if record is not None:
                records.append(record)
    return records


TUNING_JOB = re.compile(r"-lr[0-9.e+-]+-s\d+$")


def gather_records(results: Path, stored: Path) -> list[dict[str, Any]]:
    """The records in ``stored``, merged with (and updated by) the completed runs under ``results``."""
    records = read_records(stored)
    if results.is_dir():
        known = {r["job"] for r in records}
        records = merge_records(records, [r for r in collect(results) if r["job"] not in known])
        write_records(stored, records)
    return records


def preset_cuts(preset: str) -> dict[str, str]:
    """The preset's ``cut`` key: cells (``dataset/setting``) left out of it, each with its reason."""
    path = PROJECT_DIR / "conf" / "sweep" / f"{preset.replace('-', '_')}.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    cut = OmegaConf.to_container(OmegaConf.load(path)).get("cut") or {}  # type: ignore[union-attr]
    return {str(cell): " ".join(str(reason).split()) for cell, reason in cut.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-paired")
    parser.add_argument("--results", type=Path, help="sweep results folder (default results/<preset>)")
    parser.add_argument("--out", type=Path, help="report folder (default docs/results/<preset>)")
    parser.add_argument("--parallel", type=int, default=2, help="clients trained at once (Ray workers)")
    args = parser.parse_args(argv)
    results = args.results or PROJECT_DIR / "results" / args.preset
    out = args.out or PROJECT_DIR / "docs" / "results" / args.preset
    stored = out / "runs.jsonl"
    records = gather_records(results, stored)
    tuning = read_records(out / "tuning-runs.jsonl")
    fingerprints = read_records(out / "fingerprints.jsonl")
    if not records and not tuning:
        print(f"no completed runs under {results} nor in {stored}", file=sys.stderr)
        return 1
    if tuning:  # the tuning curves so far, the choices tuned.json holds in bold
        from benchmarks.tuning import write_tuning_md

        write_tuning_md(tuning, out)
    compute = out / "compute.md"
    compute.write_text(
        "\n".join(
            [f"# Measured compute: `{args.preset}`", "", *compute_section(records, tuning, fingerprints)]
        )
    )
    print(f"{len(records) + len(tuning) + len(fingerprints)} jobs → {compute}")
    if not records:
        return 0
    path = write_report(
        records, out, args.preset, args.parallel, tuning, fingerprints, preset_cuts(args.preset)
    )
    print(f"{len(records)} runs → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
