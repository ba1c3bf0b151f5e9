"""The four seed papers' claims (C1–C4), each decided by paired 95 % intervals over shared seeds.

A claim is a list of comparisons "a beats b" (held when a − b's interval lies above zero) or "a
matches b" (at least as good: held when the interval's lower end is above −``MATCH_MARGIN``, did not
hold when it lies below zero), each in named cells (dataset/setting). A claim held when every
comparison held, did not hold when any comparison's interval says the opposite, and is not resolved
otherwise. A comparison whose sides both score like a model that learned nothing says nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.stats import Interval, mean_interval, paired_difference

#: "Matches" tolerates a loss this small (accuracy points, 1 pp) when the interval cannot rule it out.
MATCH_MARGIN = 0.01
HELD, NOT_HELD, OPEN = "held", "did not hold", "not resolved"

Runs = dict[tuple[str, str], dict[str, list[dict[str, Any]]]]  # (dataset, setting) → method → runs


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    kind: str  # beats | matches | faster (fewer rounds to the target)
    cells: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SeedClaim:
    key: str
    paper: str
    text: str
    comparisons: tuple[Comparison, ...]
    extra: Callable[[Runs, list[dict[str, Any]]], list[str]] | None = None


@dataclass
class Outcome:
    comparison: Comparison
    cell: tuple[str, str]
    interval: Interval | None
    verdict: str | None  # None: not run here, or both at chance
    words: str


TEXT = ("sst2", "dir05")
IMAGES = ("cifar10", "vision_dir05")
SHIFT = ("cifar10", "vision_shift")
DP = (("sst2", "dp3"), ("sst2", "dp8"))


def by_cell(records: list[dict[str, Any]]) -> Runs:
    cells: Runs = defaultdict(lambda: defaultdict(list))
    for record in records:
        cells[(record["dataset"], record.get("setting") or record["partition"])][record["method"]].append(
            record
        )
    return cells


def finals(runs: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Each seed's final metric (runs without a scored last round are left out)."""
    return {
        int(r["seed"]): float(r["rounds"][-1]["metric"])
        for r in runs
        if r["rounds"] and r["rounds"][-1]["metric"] is not None
    }


def rounds_to_target(run: dict[str, Any], target: float) -> float:
    """The first scored round whose metric reaches ``target``; one scoring interval past the last
    round when none does (censored)."""
    scored = [(row["round"], row["metric"]) for row in run["rounds"] if row["metric"] is not None]
    if not scored:
        return math.inf
    for round_, metric in scored:
        if round_ >= 1 and metric >= target:
            return float(round_)
    step = scored[-1][0] - scored[-2][0] if len(scored) > 1 else 1
    return float(scored[-1][0] + step)


def at_chance(runs: Sequence[dict[str, Any]]) -> bool:
    """The rule's mean final accuracy is within two sampling standard errors of always answering the
    commonest label, or below it: the criterion the cell tables mark with ° (``MethodRow.at_chance``),
    so a claim and its cell never disagree on whether a rule learned anything."""
    if not runs or any(not run.get("chance") or not run["rounds"] for run in runs):
        return False
    chance = runs[0]["chance"]
    mean = float(np.mean([run["rounds"][-1]["metric"] for run in runs]))
    se = math.sqrt(max(mean * (1 - mean), 1e-12) / chance["eval_examples"])
    return mean - chance["majority_rate"] < 2 * se


def judge(
    comparison: Comparison, cell: tuple[str, str], runs: Runs, cuts: dict[str, str] | None = None
) -> Outcome:
    methods = runs.get(cell, {})
    a, b = methods.get(comparison.a), methods.get(comparison.b)
    name = "/".join(cell)
    if not a or not b:
        cut = name in (cuts or {})
        return Outcome(
            comparison,
            cell,
            None,
            None,
            f"{name}: " + ("cut from this preset" if cut else "not run"),
        )
    if comparison.kind == "faster":
        target = float(min(np.mean(list(finals(a).values())), np.mean(list(finals(b).values()))))
        ra = {int(r["seed"]): rounds_to_target(r, target) for r in a}
        rb = {int(r["seed"]): rounds_to_target(r, target) for r in b}
        found = paired_difference(rb, ra)  # b's rounds − a's: positive when a is faster
        unit = f"rounds to {target * 100:.1f} % ({comparison.b} − {comparison.a})"
        scale = 1.0
    else:
        found = paired_difference(finals(a), finals(b))
        unit, scale = "pp", 100.0
    if found is None:
        return Outcome(comparison, cell, None, None, f"{name}: no shared seeds")
    shown = f"{name}: {found.bounds(scale)} {unit}, {found.n} seeds"
    if at_chance(a) and at_chance(b):
        return Outcome(comparison, cell, found, None, shown + " (both at chance: says nothing)")
    return Outcome(comparison, cell, found, decide(found, comparison.kind), shown)


def decide(found: Interval, kind: str) -> str:
    if found.n < 2:
        return OPEN
    if kind == "matches":
        return NOT_HELD if found.high < 0 else HELD if found.low > -MATCH_MARGIN else OPEN
    return HELD if found.low > 0 else NOT_HELD if found.high < 0 else OPEN


def combine(verdicts: Sequence[str | None]) -> str:
    """The claim's verdict from its comparisons' (None: not run here, or both sides at chance): it
    held only when every comparison in every cell held."""
    decided = [v for v in verdicts if v in (HELD, NOT_HELD)]
    if all(v is None for v in verdicts):
        return "not run"
    if NOT_HELD in decided:
        return NOT_HELD if HELD not in decided else "did not hold in part"
    if len(decided) < len(verdicts):
        return f"{OPEN} ({len(decided)} of {len(verdicts)} comparisons decided)"
    return HELD if all(v == HELD for v in decided) else OPEN


def _dp_gain(runs: Runs, records: list[dict[str, Any]]) -> list[str]:
    """C2's "most of all under DP-SGD": FFA-LoRA's paired lead over FedIT under DP minus its lead
    without, per seed (the partitions and draws are the same in every cell of a seed)."""
    lines: list[str] = []
    base = runs.get(TEXT, {})
    if not base.get("ffa_lora") or not base.get("fedit"):
        return lines
    lead = _lead(base)
    for cell in DP:
        methods = runs.get(cell, {})
        if not methods.get("ffa_lora") or not methods.get("fedit"):
            continue
        under = _lead(methods)
        seeds = sorted(lead.keys() & under.keys())
        if len(seeds) < 2:
            continue
        found = mean_interval([under[s] - lead[s] for s in seeds])
        lines.append(
            f"  - larger under DP ({'/'.join(cell)} vs {'/'.join(TEXT)}): {found.bounds()} pp, "
            f"{found.n} seeds — {decide(found, 'beats')}"
        )
    return lines


def _lead(methods: dict[str, list[dict[str, Any]]]) -> dict[int, float]:
    ffa, fedit = finals(methods["ffa_lora"]), finals(methods["fedit"])
    return {s: ffa[s] - fedit[s] for s in ffa.keys() & fedit.keys()}


def _upload_and_sensitivity(runs: Runs, records: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    methods = runs.get(TEXT, {})
    if methods.get("ffa_lora") and methods.get("fedit"):
        up = {
            m: np.mean([sum(r["bytes_up"] or 0 for r in run["rounds"]) for run in methods[m]])
            for m in ("ffa_lora", "fedit")
        }
        ratio = up["ffa_lora"] / up["fedit"]
        lines.append(
            f"  - half the upload: {ratio:.3f} of FedIT's bytes up — {HELD if ratio <= 0.55 else NOT_HELD}"
        )
    curves = _tuning_spread(
        [
            r
            for r in records
            if r.get("stage") == "tune"
            and (r["dataset"], r.get("setting")) == TEXT
            and r["method"] in ("ffa_lora", "fedit")
        ]
    )
    if {"ffa_lora", "fedit"} <= curves.keys():
        (fl, fs), (_, es) = curves["ffa_lora"], curves["fedit"]
        lines.append(
            f"  - learning-rate sensitivity: best − worst on the tuning split over the {fl} learning "
            f"rates both ran, FFA-LoRA {fs * 100:.1f} pp vs FedIT {es * 100:.1f} pp — "
            + ("a smaller spread" if fs < es else "not a smaller spread")
            + " (one seed, no interval: indicative, not a verdict; the curves are in the tuning table)"
        )
    return lines


def _tuning_spread(records: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """Per method: how many learning rates its tuning runs share with the others', and the spread
    (best − worst final score) over those."""
    scores: dict[str, dict[float, float]] = defaultdict(dict)
    for record in records:
        final = record["rounds"][-1]["metric"]
        if final is not None:
            scores[record["method"]][round(float(record.get("lr_mult") or _mult(record)), 4)] = float(final)
    shared = set.intersection(*(set(v) for v in scores.values())) if scores else set()
    return {
        m: (len(shared), max(v[k] for k in shared) - min(v[k] for k in shared))
        for m, v in scores.items()
        if shared
    }


def _mult(record: dict[str, Any]) -> float:
    """The tuning job's multiplier, from its name (``...-lr<mult>-s<seed>``)."""
    return float(record["job"].rsplit("-lr", 1)[1].rsplit("-s", 1)[0])


CLAIMS = (
    SeedClaim(
        "C1",
        "Why Gradient Subspace?",
        "direct weight averaging of full fine-tuning beats the LoRA rules (FedIT, FFA-LoRA, FlexLoRA), and "
        "GaLore as the local optimizer beats FlexLoRA and FFA-LoRA, on text and images",
        tuple(
            Comparison(a, b, "beats", (TEXT, IMAGES))
            for a, b in (
                ("full", "fedit"),
                ("full", "ffa_lora"),
                ("full", "flexlora"),
                ("galore", "flexlora"),
                ("galore", "ffa_lora"),
            )
        ),
    ),
    SeedClaim(
        "C2",
        "FFA-LoRA",
        "freezing A matches or beats FedIT, most of all under DP-SGD, with half the upload and less "
        "sensitivity to the learning rate",
        (Comparison("ffa_lora", "fedit", "matches", (TEXT, *DP)),),
        lambda runs, records: _upload_and_sensitivity(runs, records) + _dp_gain(runs, records),
    ),
    SeedClaim(
        "C3",
        "HLoRA",
        "with heterogeneous client ranks (4/8/16) HLoRA converges faster and ends higher than HetLoRA and "
        "FlexLoRA's truncation",
        (
            Comparison("hlora", "hetlora", "beats", (TEXT,)),
            Comparison("hlora", "flexlora", "beats", (TEXT,)),
            Comparison("hlora", "hetlora", "faster", (TEXT,)),
            Comparison("hlora", "flexlora", "faster", (TEXT,)),
        ),
    ),
    SeedClaim(
        "C4",
        "LoRA-FAIR",
        "the server-side correction beats FedIT, FFA-LoRA and FlexLoRA under feature shift (images) and "
        "label skew",
        tuple(
            Comparison("lora_fair", b, "beats", (TEXT, IMAGES, SHIFT))
            for b in ("fedit", "ffa_lora", "flexlora")
        ),
    ),
)


def claims_section(
    records: list[dict[str, Any]],
    tuning: Sequence[dict[str, Any]] = (),
    cuts: dict[str, str] | None = None,
) -> list[str]:
    """The report's verdict per claim, with every comparison's paired interval and cells; ``cuts``:
    the cells (``dataset/setting``) the preset leaves out, with the measured reason."""
    runs = by_cell(records)
    lines = [
        "## The seed papers' claims (C1–C4)",
        "",
        "Each comparison is the paired difference of final metrics over the seeds both rules ran "
        f"(95 % t interval). *beats*: held when the interval lies above zero; *matches*: held when its lower "
        f"end is above −{MATCH_MARGIN * 100:.0f} pp, did not hold when it lies below zero; *faster*: the "
        "paired difference of rounds to reach the lower of the two rules' mean final metrics (scored "
        "rounds only; a run that never reaches it counts one scoring interval past the last round). A "
        "claim held when every comparison held.",
        "",
    ]
    for claim in CLAIMS:
        outcomes = [judge(c, cell, runs, cuts) for c in claim.comparisons for cell in c.cells]
        lines.append(
            f"- **{claim.key} ({claim.paper})** — {claim.text}: **{combine([o.verdict for o in outcomes])}**."
        )
        for o in outcomes:
            said = o.verdict or "no verdict"
            lines.append(f"  - `{o.comparison.a}` {o.comparison.kind} `{o.comparison.b}` — {o.words}: {said}")
        if claim.extra is not None:
            lines += claim.extra(runs, [*records, *tuning])
    if cuts:
        lines += ["", "Cells the claims name that this preset leaves out, and why:", ""]
        lines += [f"- `{cell}`: {reason}" for cell, reason in sorted(cuts.items())]
    return lines
