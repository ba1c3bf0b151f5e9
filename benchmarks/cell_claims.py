"""The papers' claims checked one comparison each in every cell of the report, under the older rule
("at least as good" holds unless the paired interval lies below zero); the seed papers' claims over
their named cells are ``benchmarks.claims``'s.

A claim's test gives its verdict on one cell's rows, with the numbers in words; None if not run.
With two or more seeds both sides ran, the paired interval of the difference decides (held / did
not hold only when it excludes zero); a single seed falls back to the noise band. Both sides at
chance: inconclusive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.method_table import LORA_FAMILY, PERSONALISED, MethodRow, MethodTable
from benchmarks.stats import Interval, Verdict, paired_difference, verdict

Outcome = Verdict | None  # None: both sides score like a model that learned nothing
ClaimResult = tuple[Outcome, str] | None
ClaimTest = Callable[[dict[str, MethodRow]], ClaimResult]

OUTCOME_WORDS: dict[Outcome, str] = {
    Verdict.HELD: "held",
    Verdict.DID_NOT_HOLD: "**did not hold**",
    Verdict.NOT_RESOLVED: "not resolved",
    None: "inconclusive (both at chance)",
}


@dataclass
class Claim:
    paper: str
    claim: str
    test: ClaimTest


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
    """Method ``a`` against ``b`` in one cell; None unless both ran."""
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


def at_least_as_good(a: str, b: str) -> ClaimTest:
    """The test that ``a`` scores at least as well as ``b``."""

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


def _beats_lora_family(method: str) -> ClaimTest:
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
        at_least_as_good("fedex_lora", "fedit"),
    ),
    Claim(
        "FLoRA",
        "stacking (exact, any ranks) is at least as good as FedIT",
        at_least_as_good("flora", "fedit"),
    ),
    Claim(
        "LoRA-FAIR",
        "the server-side correction is at least as good as FedIT",
        at_least_as_good("lora_fair", "fedit"),
    ),
    Claim(
        "FlexLoRA",
        "heterogeneous ranks via SVD redistribution are at least as good as FedIT",
        at_least_as_good("flexlora", "fedit"),
    ),
    Claim("HLoRA", "the QR-compact SVD gives FlexLoRA's result", at_least_as_good("hlora", "flexlora")),
    Claim(
        "FedSVD",
        "re-factoring B̄A by its SVD is at least as good as FFA-LoRA",
        at_least_as_good("fedsvd", "ffa_lora"),
    ),
    Claim(
        "RoLoRA",
        "alternating A and B is at least as good as FFA-LoRA",
        at_least_as_good("rolora", "ffa_lora"),
    ),
    Claim("RoLoRA", "... and as FedIT", at_least_as_good("rolora", "fedit")),
    Claim(
        "Fed-SB",
        "training only R is at least as good as FedIT, at a fraction of the upload",
        at_least_as_good("fed_sb", "fedit"),
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


def _claim_lines(claim: Claim, table: MethodTable) -> list[str]:
    """The claim and its verdict in every cell where it was tested; nothing if in none."""
    verdicts = []
    for (dataset, partition), rows in table.items():
        outcome = claim.test({r.method: r for r in rows})
        if outcome is not None:
            held, words = outcome
            verdicts.append(f"{dataset}/{partition}: {OUTCOME_WORDS[held]} — {words}")
    if not verdicts:
        return []
    return [f"- **{claim.paper}**: {claim.claim}.", *(f"  - {v}" for v in verdicts)]


def _personalised_lines(method: str, table: MethodTable) -> list[str]:
    """A personalised method's final metric against its clients' own chance level, per cell."""
    found = [(key, r) for key, rows in table.items() for r in rows if r.method == method]
    if not found:
        return []
    lines = [
        f"- `{method}` is scored on each client's own validation share (personalised), so its figure "
        "is not comparable with the common test set of the other rules; against always answering "
        "each client's commonest label:"
    ]
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


def claims_text(table: MethodTable) -> list[str]:
    """Every claim's verdict per cell, then the personalised methods against chance."""
    lines = [line for claim in CLAIMS for line in _claim_lines(claim, table)]
    return lines + [line for method in PERSONALISED for line in _personalised_lines(method, table)]


def cell_claims_section(table: MethodTable) -> list[str]:
    """The report's section "Claims per cell, one comparison each"."""
    return [
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
