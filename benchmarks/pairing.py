"""Which benchmark runs may be compared as pairs.

Two runs of one seed are a pair only when the same code trained them. Runs from a tree with
uncommitted code (``+dirty``) or of unknown code are refused. Within a cell (model, dataset,
setting) the runs of the reference commit — the one that ran the cell's fingerprint job — are kept;
runs from another commit are kept only when git shows no change to the job code between the two
commits, or that commit re-ran the fingerprint job (``fingerprints.jsonl``, written by the sweep)
and reproduced the reference record bit for bit: every round's metric, losses and bytes.
"""

from __future__ import annotations

import itertools
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


def is_clean(record: dict[str, Any]) -> bool:
    commit = str(record.get("commit") or "")
    return bool(commit) and not commit.endswith("+dirty")


def fingerprint_record(runs: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    """The job to re-run at a new commit: ``method`` (else the first method by name) at its lowest
    seed, among the clean ``runs``."""
    runs = [r for r in runs if is_clean(r)]
    if not runs:
        return None
    chosen = method if any(r["method"] == method for r in runs) else min(r["method"] for r in runs)
    return min((r for r in runs if r["method"] == chosen), key=lambda r: int(r["seed"]))


def equivalent_commits(
    runs: list[dict[str, Any]], fingerprints: list[dict[str, Any]], same_code: Callable[[str, str], bool]
) -> tuple[dict[str, str], list[str]]:
    """Commits that train identically, as classes (commit → its class's representative), and the
    evidence: one job recorded at two commits with the same metrics bit for bit (a run and a
    fingerprint re-run, or two re-runs), or git showing no change to the job code between them."""
    parent = {str(r["commit"]): str(r["commit"]) for r in [*runs, *fingerprints]}

    def find(commit: str) -> str:
        while parent[commit] != commit:
            commit = parent[commit]
        return commit

    evidence = []
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in [*runs, *fingerprints]:
        by_job[record["job"]].append(record)
    for job, copies in sorted(by_job.items()):
        for first, second in itertools.pairwise(copies):
            a, b = str(first["commit"]), str(second["commit"])
            if a != b and find(a) != find(b) and signature(first) == signature(second):
                parent[find(b)] = find(a)
                evidence.append(f"`{job}` at `{a}` and at `{b}`: the same metrics bit for bit")
    commits = sorted(parent)
    for i, a in enumerate(commits):
        for b in commits[i + 1 :]:
            if find(a) != find(b) and same_code(a, b):
                parent[find(b)] = find(a)
                evidence.append(f"`{a}` and `{b}`: git shows no change to the job code between them")
    return {c: find(c) for c in commits}, evidence


def admit(
    records: list[dict[str, Any]],
    fingerprints: list[dict[str, Any]],
    method: str = "fedit",
    same_code: Callable[[str, str], bool] = lambda a, b: False,
) -> Admission:
    """The records that may be paired, and why the others may not. Within a cell, the largest
    class of equivalent commits (``equivalent_commits``) is kept; ``same_code(a, b)``: whether git
    shows the two commits' job code identical."""
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
        name = "/".join(part for part in cell if part)
        if len({r["commit"] for r in runs}) == 1:
            result.kept.extend(runs)
            continue
        cell_prints = [f for f in fingerprints if is_clean(f) and cell_of(f) == cell]
        classes, evidence = equivalent_commits(runs, cell_prints, same_code)
        sizes = Counter(classes[str(r["commit"])] for r in runs)
        reference = fingerprint_record(runs, method)
        assert reference is not None
        # the class holding most runs (ties: the one holding the fingerprint job)
        kept_class = max(sizes, key=lambda c: (sizes[c], c == classes[str(reference["commit"])]))
        members = sorted(
            c for c, k in classes.items() if k == kept_class and any(r["commit"] == c for r in runs)
        )
        if len(members) > 1:
            result.notes.append(
                f"{name}: runs at {', '.join(f'`{c}`' for c in members)} paired — " + "; ".join(evidence)
            )
        for record in runs:
            if classes[str(record["commit"])] == kept_class:
                result.kept.append(record)
            else:
                result.refused[record["job"]] = (
                    f"{name}: mixed training code — no run shows `{record['commit']}` trains like "
                    f"{', '.join(f'`{c}`' for c in members)} (no fingerprint re-run reproduced bit for bit)"
                )
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
