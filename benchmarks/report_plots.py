"""The report's plots: per dataset and setting, the main metric vs round and vs cumulative MB
communicated per client, one fixed colour per method."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.method_table import MB, RunsByCell, grouped, method_rank, shared_centralized

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PALETTE = (
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
)  # fmt: skip  # one fixed colour per method (by its place in METHOD_ORDER), the same in every plot


def _plot_method(by_round: Axes, by_bytes: Axes, method: str, runs: list[dict[str, Any]]) -> None:
    """The method's metric averaged over its runs (the rounds all of them have): vs round and, for
    a federated rule, vs cumulative MB per client."""
    length = min(len(r["rounds"]) for r in runs)
    metric = np.mean(
        [[np.nan if row["metric"] is None else row["metric"] for row in r["rounds"][:length]] for r in runs],
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
    style: dict[str, Any] = {
        "label": method,
        "marker": ".",
        "color": PALETTE[method_rank(method) % len(PALETTE)],
    }
    if method == "centralized":
        by_round.plot(rounds[scored], metric[scored], "--", **style)
        return
    by_round.plot(rounds[scored], metric[scored], "-", **style)
    sent, from_one = np.mean(per_client, axis=0), scored & (rounds >= 1)
    by_bytes.plot(sent[from_one], metric[from_one], "-", **style)


def _plot_cell(groups: RunsByCell, cell: tuple[str, str], main_metric: str, folder: Path) -> Path:
    """One cell's figure (the dataset's centralized runs from another partition where the cell has
    none), saved as ``<dataset>-<setting>.png`` in ``folder``."""
    import matplotlib.pyplot as plt

    dataset, partition = cell
    methods = groups[cell]
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    shared = None if "centralized" in methods else shared_centralized(groups, dataset)
    curves = {**methods, **({"centralized": shared[1]} if shared else {})}
    for method, runs in sorted(curves.items(), key=lambda kv: method_rank(kv[0])):
        _plot_method(by_round, by_bytes, method, runs)
    by_round.set(xlabel="round", ylabel=main_metric, title=f"{dataset} / {partition}: {main_metric} vs round")
    by_bytes.set(
        xlabel="MB communicated per client (down + up, cumulative)", ylabel=main_metric, xscale="log"
    )
    by_bytes.set_title(f"{dataset} / {partition}: {main_metric} vs communication")
    for axes in (by_round, by_bytes):
        if axes.get_lines():
            axes.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = folder / f"{dataset}-{partition}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Per dataset and partition: metric vs round, and metric vs cumulative MB per client."""
    import matplotlib

    matplotlib.use("Agg")
    groups = grouped(records)
    return [_plot_cell(groups, cell, records[0]["main_metric"], folder) for cell in sorted(groups)]
