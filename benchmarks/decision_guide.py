"""Paired comparisons of the rules in a cell: the per-cell table of each rule's paired difference to
FedIT and to the best LoRA rule, and the decision guide (which rule to use for accuracy, and which
for tight bandwidth)."""

from __future__ import annotations

from benchmarks.method_table import LORA_FAMILY, PERSONALISED, MethodRow, MethodTable
from benchmarks.stats import advise, paired_difference, verdict


def _contenders(rows: list[MethodRow]) -> list[MethodRow]:
    """The federated rules scored on the common evaluation set."""
    return [r for r in rows if r.method != "centralized" and r.method not in PERSONALISED]


def _against(row: MethodRow, other: MethodRow | None) -> str:
    """``row``'s paired difference to ``other`` with its verdict (``other`` named unless FedIT)."""
    if other is None or other is row:
        return "—"
    found = paired_difference(row.per_seed, other.per_seed)
    if found is None:
        return "no shared seeds"
    return f"{found.bounds()} {verdict(found).value}" + (
        f" (`{other.method}`)" if other.method != "fedit" else ""
    )


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
    for row in contenders:
        best_other = max((r for r in lora if r is not row), key=lambda r: r.final[0], default=None)
        lines.append(
            f"| `{row.method}` | {row.seeds} | {row.interval.points()} "
            f"| {_against(row, by_name.get('fedit'))} | {_against(row, best_other)} |"
        )
    return "\n".join(lines)


def _bandwidth_line(contenders: list[MethodRow], best: MethodRow) -> str:
    """The cheapest rule (MB per client) whose paired difference to ``best`` is not resolved."""
    close = [
        r
        for r in contenders
        if r is best or not ((d := paired_difference(r.per_seed, best.per_seed)) and d.resolved)
    ]
    cheapest = min(close, key=lambda r: r.mb_down + r.mb_up)
    if cheapest is best:
        return f"  - tight bandwidth: `{best.method}` is also the cheapest of the rules that match it."
    sent, most = cheapest.mb_down + cheapest.mb_up, best.mb_down + best.mb_up
    return (
        f"  - tight bandwidth: `{cheapest.method}` sends {sent:.1f} MB per client (vs {most:.1f} MB "
        f"for `{best.method}`) at {cheapest.interval.points()} %, not resolved below the best."
    )


def _cell_guide(cell: str, contenders: list[MethodRow]) -> list[str]:
    """One cell's advice: the rule for accuracy, then the rule for tight bandwidth."""
    if all(r.at_chance for r in contenders):
        return [f"- **{cell}**: every rule is at chance; these runs cannot guide a choice."]
    advice = advise(cell, {r.method: r.per_seed for r in contenders})
    assert advice is not None
    best = next(r for r in contenders if r.method == advice.best)
    return [f"- {advice.text()}", _bandwidth_line(contenders, best)]


def decision_guide(table: MethodTable) -> list[str]:
    """Per dataset and setting: which rule to use for accuracy (and by how much it leads the
    runner-up, paired) and, for tight bandwidth, the cheapest rule not resolved below the best."""
    lines = []
    for (dataset, setting), rows in table.items():
        contenders = [r for r in _contenders(rows) if r.per_seed]
        if contenders:
            lines += _cell_guide(f"{dataset} / {setting}", contenders)
    return lines


def decision_guide_section(table: MethodTable) -> list[str]:
    """The report's section "Decision guide"; nothing where no cell has a contender."""
    guide = decision_guide(table)
    if not guide:
        return []
    return [
        "## Decision guide",
        "",
        "Generated from the numbers below: a seed fixes the partition, the client draws and the data "
        "order for every rule of a cell, so rules are compared by their paired per-seed differences "
        "(t interval, 95 %); a lead whose interval spans zero is *not resolved*.",
        "",
        *guide,
        "",
    ]
