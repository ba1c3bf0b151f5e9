"""A run's folder: resolved config, per-round metrics, summary and the final adapter."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from experiment_schema import ExperimentConfig, experiment_hash
from server_app.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)
EVAL_PREFIX = "eval_"


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``: what a round (or round 0, the initial evaluation) did. The
    federated loop, the centralized baseline and the benchmark reader all use this one schema."""

    round: int
    eval: dict[str, float]  # the evaluation's metrics, written as eval_<name>
    train_loss: float | None = None
    lr: float | None = None
    bytes_down: int = 0  # serialized array records, all clients
    bytes_up: int = 0
    bytes_down_per_client: dict[str, int] = field(default_factory=dict)
    bytes_up_per_client: dict[str, int] = field(default_factory=dict)
    payload_bytes_down: int = 0  # raw bytes of the arrays alone
    payload_bytes_up: int = 0
    clients_sampled: int = 0
    clients_aggregated: int = 0
    partitions_aggregated: list[int | None] = field(default_factory=list)
    clients_rejected: dict[str, str] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)  # federation.update_bound on
    updates_clipped: dict[str, float] = field(default_factory=dict)  # node -> scale applied
    replies_ignored: list[str] = field(default_factory=list)  # duplicates, with why
    kept_previous: bool = False
    slowest_client_seconds: float | None = None
    client_seconds_total: float = 0.0
    client_seconds: list[float] = field(default_factory=list)  # each client's training time
    client_handler_seconds: list[float] = field(default_factory=list)  # ... and its whole handler
    # the slowest client's process start (first message only), model set-up and data preparation
    slowest_startup_seconds: float | None = None
    slowest_setup_seconds: float | None = None
    slowest_data_seconds: float | None = None
    peak_client_memory_mb: float | None = None
    server_peak_rss_mb: float | None = None  # the ServerApp process while it trains and aggregates
    checkpoint_mb: float | None = None  # this round's server checkpoint, and the time to write it
    checkpoint_seconds: float | None = None
    examples_seen: int | None = None
    optimizer_state_bytes: int | None = None
    dp_epsilon: float | None = None
    train_phase_seconds: float = 0.0
    eval_seconds: float = 0.0
    seconds: float = 0.0

    #: What a benchmark's compact run record keeps of every round (besides the main metric).
    COMPACT: ClassVar[tuple[str, ...]] = (
        "round", "eval_loss", "train_loss", "bytes_down", "bytes_up", "payload_bytes_down",
        "payload_bytes_up", "clients_sampled", "clients_aggregated", "slowest_client_seconds",
        "client_seconds_total", "client_seconds", "client_handler_seconds", "train_phase_seconds",
        "eval_seconds", "seconds", "peak_client_memory_mb", "server_peak_rss_mb",
    )  # fmt: skip

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        metrics = row.pop("eval")
        return {"round": row.pop("round"), **{EVAL_PREFIX + k: v for k, v in metrics.items()}, **row}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RoundRecord:
        """A line of ``metrics.jsonl`` (older lines may lack fields: they take the defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        metrics = {
            k[len(EVAL_PREFIX) :]: v for k, v in row.items() if k.startswith(EVAL_PREFIX) and k not in names
        }
        return cls(eval=metrics, **{k: v for k, v in row.items() if k in names and k != "eval"})

    def compact(self, main_metric: str) -> dict[str, Any]:
        row = self.to_row()
        return {**{key: row.get(key) for key in self.COMPACT}, "metric": self.eval.get(main_metric)}


def yaml_config(folder: Path) -> dict[str, Any]:
    """A run folder's resolved ``config.yaml`` as a plain dict."""
    from omegaconf import OmegaConf

    path = folder / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a run folder: it has no config.yaml")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def _shown(value: float | None) -> str:
    """A metric in a log line or table; "-" for a round that did not record it."""
    return "-" if value is None else f"{value:.4f}"


TABLE_COLUMNS = ("round", "main", "eval_loss", "train_loss", "mb_down", "mb_up", "clients", "seconds")


class RunRecorder:
    """Writes ``<output_dir>/<date-time>-<name>/``: config.yaml, metrics.jsonl, summary.json."""

    def __init__(self, folder: Path, main_metric: str, tracker: Tracker | None = None) -> None:
        self.folder = folder
        self.main_metric = main_metric
        self.rows: list[dict[str, Any]] = []  # RoundRecord.to_row() of every round so far
        self.tracker = tracker or Tracker()

    @classmethod
    def create(cls, cfg: ExperimentConfig) -> RunRecorder:
        root = Path(cfg.output_dir)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = root / f"{stamp}-{cfg.run_name}"
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = root / f"{stamp}-{cfg.run_name}-{suffix}"
        folder.mkdir(parents=True)
        cfg.experiment_id = f"{folder.name}-{experiment_hash(cfg)[:8]}"
        (folder / "config.yaml").write_text(cfg.to_yaml())
        return cls(folder, cfg.dataset.main_metric, open_tracker(cfg, folder))

    @classmethod
    def reopen(cls, folder: Path, cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> RunRecorder:
        """A resumed run's folder: ``metrics.jsonl`` rewritten to ``rows`` (the rounds its checkpoint
        covers; rounds logged after it are dropped, as they will be run again), then appended to."""
        saved = yaml_config(folder)
        cfg.experiment_id = str(saved.get("experiment_id") or f"{folder.name}-{experiment_hash(cfg)[:8]}")
        (folder / "config.yaml").write_text(cfg.to_yaml())
        metrics = folder / "metrics.jsonl"
        partial = metrics.with_suffix(".jsonl.partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
        partial.replace(metrics)
        recorder = cls(folder, cfg.dataset.main_metric, open_tracker(cfg, folder))
        recorder.rows = list(rows)
        return recorder

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "adapter"

    @property
    def model_dir(self) -> Path:
        """The whole fine-tuned model, for rules whose result is not an adapter alone."""
        return self.folder / "model"

    def log_round(self, record: RoundRecord) -> None:
        row = record.to_row()
        self.rows.append(row)
        self.tracker.log_round(row)
        with (self.folder / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info(
            "round %d | %s %s | eval loss %s | train loss %s | down %.2f MB up %.2f MB | %.1f s",
            row["round"],
            self.main_metric,
            _shown(row.get(f"eval_{self.main_metric}")),
            _shown(row.get("eval_loss")),
            _shown(row.get("train_loss")),
            row["bytes_down"] / 1e6,
            row["bytes_up"] / 1e6,
            row["seconds"],
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.folder / "summary.md").write_text(self.table() + "\n")
        saved = summary.get("adapter_dir") or summary.get("model_dir")
        self.tracker.finish(summary, Path(saved) if saved else None)
        log.info("results in %s\n%s", self.folder, self.table())

    def table(self) -> str:
        """The per-round table as Markdown."""
        lines = [
            "| " + " | ".join(TABLE_COLUMNS).replace("main", self.main_metric) + " |",
            "|" + "---|" * len(TABLE_COLUMNS),
        ]
        for row in self.rows:
            lines.append(
                f"| {row['round']} | {_shown(row.get(f'eval_{self.main_metric}'))} | "
                f"{_shown(row.get('eval_loss'))} | {_shown(row.get('train_loss'))} | "
                f"{row['bytes_down'] / 1e6:.2f} | {row['bytes_up'] / 1e6:.2f} | "
                f"{row['clients_aggregated']}/{row['clients_sampled']} | {row['seconds']:.1f} |"
            )
        return "\n".join(lines)
