"""What the runs cost: the measured compute of a preset (every recorded job's wall time and phases,
by stage and cell) and the efficiency of each federated run (framework and wire overhead)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from benchmarks.method_table import MB, method_rank
from benchmarks.overheads import framework_ratios, transport_ratios, wire_overhead

#: ``(stage, model, dataset, setting)``
ComputeKey = tuple[str, str, str, str]
PHASES = ("submit", "server_start", "server_setup", "train", "first_round_cold_start", "evaluate", "finish")


def _jobs_by_stage_and_cell(
    records: list[dict[str, Any]], tuning: list[dict[str, Any]], fingerprints: list[dict[str, Any]]
) -> dict[ComputeKey, list[dict[str, Any]]]:
    groups: dict[ComputeKey, list[dict[str, Any]]] = defaultdict(list)
    for stage, runs in (("report", records), ("tune", tuning), ("fingerprint", fingerprints)):
        for r in runs:
            groups[
                (stage, str(r.get("model") or ""), r["dataset"], r.get("setting") or r["partition"])
            ].append(r)
    return groups


def _median_phase(phases: list[dict[str, float]], name: str) -> str:
    """The median seconds of phase ``name`` over the jobs that recorded it."""
    values = [p[name] for p in phases if name in p]
    return f"{np.median(values):.1f}" if values else "—"


def _compute_line(key: ComputeKey, runs: list[dict[str, Any]], seconds: list[float]) -> str:
    phases = [r.get("phases") or {} for r in runs]
    median = {name: _median_phase(phases, name) for name in PHASES}
    return (
        f"| {' | '.join(key)} | {len(runs)} | {sum(seconds) / 60:.0f} | {np.median(seconds):.0f} | "
        f"{median['submit']} | {median['server_start']} | {median['server_setup']} | "
        f"{median['train']} ({median['first_round_cold_start']}) | {median['evaluate']} | "
        f"{median['finish']} |"
    )


def compute_section(
    records: list[dict[str, Any]], tuning: list[dict[str, Any]], fingerprints: list[dict[str, Any]]
) -> list[str]:
    """The measured compute of the preset so far: every recorded job's wall time (sweep records
    carry it with its phases; older records only the run's own wall time), by stage and cell."""
    groups = _jobs_by_stage_and_cell(records, tuning, fingerprints)
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
        lines.append(_compute_line(key, runs, seconds))
    lines += [
        "",
        f"Total: {total / 3600:.2f} h of measured compute over {sum(map(len, groups.values()))} jobs.",
    ]
    contended = [r for runs in groups.values() for r in runs if r.get("contended")]
    if contended:
        lost = sum(float(r.get("job_seconds") or r["wall_seconds"]) for r in contended)
        lines.append(
            f"Of those, {len(contended)} jobs ({lost / 3600:.2f} h) ran while other work shared the machine "
            "(flagged `contended`: the load average exceeded its cores, or the session says so): their "
            "metrics stand, their wall time overstates their cost, and the sweep's estimates use jobs "
            "that had the machine to themselves wherever there are any."
        )
    return [*lines, ""]


def _efficiency_line(record: dict[str, Any], parallel: int) -> str | None:
    """One federated run's overheads; None for a run without federated rounds or wire records."""
    ratios = framework_ratios(record, parallel)
    wire = wire_overhead(record)
    if not ratios or wire is None:
        return None
    rounds = [row for row in record["rounds"][1:] if row.get("clients_aggregated")]
    sent = np.mean([(row["bytes_down"] or 0) + (row["bytes_up"] or 0) for row in rounds]) / MB
    payload = (
        np.mean([(row.get("payload_bytes_down") or 0) + (row.get("payload_bytes_up") or 0) for row in rounds])
        / MB
    )
    later = f"{np.mean(ratios[1:]):.2f} ({max(ratios[1:]):.2f})" if len(ratios) > 1 else "—"
    transport = transport_ratios(record, parallel)[1:]
    flower = f"{np.mean(transport):.2f} ({max(transport):.2f})" if transport else "not recorded"
    return (
        f"| `{record['job']}` | {len(rounds)} | {ratios[0]:.2f} | {later} | {sent:.2f} / {payload:.2f} "
        f"| {flower} | {wire:.3f} |"
    )


def efficiency_table(records: list[dict[str, Any]], parallel: int) -> str:
    """One line per federated run: framework overhead in the first round (which also starts the
    client processes and loads their models) and over the later rounds, and the wire overhead."""
    lines = [
        "| run | rounds | framework overhead: round 1 | rounds 2+: mean (max) | MB per round (wire / arrays) "
        "| of which Flower: rounds 2+ mean (max) | wire overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(
        records, key=lambda r: (r["dataset"], r["partition"], method_rank(r["method"]), r["seed"])
    )
    lines += [line for record in ordered if (line := _efficiency_line(record, parallel)) is not None]
    return "\n".join(lines)


def efficiency_section(records: list[dict[str, Any]], parallel: int) -> list[str]:
    """The report's section "Efficiency per run"."""
    return [
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
