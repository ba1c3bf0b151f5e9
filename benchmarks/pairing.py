"""Which benchmark runs may be compared as pairs.

Two runs of one seed are a pair only when the same code trained them. Runs from a tree with
uncommitted code (``+dirty``) or of unknown code are refused. Within a cell (model, dataset,
setting) the runs of the reference commit — the one that ran the cell's fingerprint job — are kept;
runs from another commit are kept only when git shows no change to the job code between the two
commits, or that commit re-ran the fingerprint job (``fingerprints.jsonl``, written by the sweep)
and reproduced the reference record bit for bit: every round's metric, losses and bytes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: What a fingerprint must reproduce, per round.
SIGNATURE = ("round", "metric", "eval_loss", "train_loss", "bytes_down", "bytes_up")


def signature(record: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [tuple(row.get(key) for key in SIGNATURE) for row in record["rounds"]]


def cell_of(record: dict[str, Any]) -> tuple[str, str, str]:
    return (
        str(record.get("model") or ""),
        str(record["dataset"]),
        str(record.get("setting") or record["partition"]),
    )


@dataclass
class Admission:
    kept: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # job → why
    notes: list[str] = field(default_factory=list)


def fingerprint_record(runs: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    """The cell's fingerprint job: ``method`` (else the first method by name) at the lowest seed."""
    if not runs:
        return None
    chosen = method if any(r["method"] == method for r in runs) else min(r["method"] for r in runs)
    return min((r for r in runs if r["method"] == chosen), key=lambda r: int(r["seed"]))


def admit(
    records: list[dict[str, Any]],
    fingerprints: list[dict[str, Any]],
    method: str = "fedit",
    same_code: Callable[[str, str], bool] = lambda a, b: False,
) -> Admission:
    """The records that may be paired, and why the others may not. ``same_code(a, b)``: whether
    git shows the two commits' job code identical (then no fingerprint is needed)."""
    result = Admission()
    clean: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        commit = str(record.get("commit") or "")
        if not commit:
            result.refused[record["job"]] = "unknown code (no commit recorded)"
        elif commit.endswith("+dirty"):
            result.refused[record["job"]] = f"made from uncommitted code ({commit})"
        else:
            clean[cell_of(record)].append(record)
    for cell, runs in sorted(clean.items()):
        commits = Counter(str(r["commit"]) for r in runs)
        name = "/".join(part for part in cell if part)
        if len(commits) == 1:
            result.kept.extend(runs)
            continue
        reference = fingerprint_record(runs, method)
        assert reference is not None
        ref_commit = str(reference["commit"])
        for commit in sorted(commits):
            at_commit = [r for r in runs if r["commit"] == commit]
            if commit == ref_commit:
                result.kept.extend(at_commit)
                continue
            if same_code(ref_commit, commit):
                result.kept.extend(at_commit)
                result.notes.append(
                    f"{name}: {len(at_commit)} runs at `{commit}` paired with `{ref_commit}`'s: git shows no "
                    "change to the job code between them (only reports, tests or docs)"
                )
                continue
            rerun = next(
                (f for f in fingerprints if f["job"] == reference["job"] and f.get("commit") == commit), None
            )
            if rerun is not None and signature(rerun) == signature(reference):
                result.kept.extend(at_commit)
                result.notes.append(
                    f"{name}: {len(at_commit)} runs at `{commit}` paired with {commits[ref_commit]} at "
                    f"`{ref_commit}`: `{reference['job']}` re-run at `{commit}` reproduced its record "
                    "bit for bit"
                )
                continue
            why = (
                f"`{reference['job']}` re-run at `{commit}` did not reproduce `{ref_commit}`'s record"
                if rerun is not None
                else f"no fingerprint run of `{reference['job']}` at `{commit}`"
            )
            for record in at_commit:
                result.refused[record["job"]] = f"{name}: mixed training code — {why}"
    return result


def provenance_lines(admission: Admission) -> list[str]:
    """The report's account of which runs it paired and which it refused."""
    lines = list(f"- {note}" for note in admission.notes)
    if admission.refused:
        reasons = Counter(admission.refused.values())
        lines += [f"- refused, {count} run(s): {reason}" for reason, count in sorted(reasons.items())]
    if not lines:
        lines.append("- every cell's runs come from one commit; all are paired.")
    return lines
