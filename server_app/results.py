"""A run's folder: resolved config, per-round metrics, summary and the final adapter."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune.config import ExperimentConfig

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("round", "main", "eval_loss", "train_loss", "mb_down", "mb_up", "clients", "seconds")


class RunRecorder:
    """Writes ``<output_dir>/<date-time>-<name>/``: config.yaml, metrics.jsonl, summary.json."""

    def __init__(self, folder: Path, main_metric: str) -> None:
        self.folder = folder
        self.main_metric = main_metric
        self.rows: list[dict[str, Any]] = []

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
        (folder / "config.yaml").write_text(cfg.to_yaml())
        return cls(folder, cfg.dataset.main_metric)

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "adapter"

    @property
    def model_dir(self) -> Path:
        """The whole fine-tuned model, for rules whose result is not an adapter alone."""
        return self.folder / "model"

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with (self.folder / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info(
            "round %d | %s %.4f | eval loss %.4f | train loss %s | down %.2f MB up %.2f MB | %.1f s",
            row["round"],
            self.main_metric,
            row[f"eval_{self.main_metric}"],
            row["eval_loss"],
            "-" if row.get("train_loss") is None else f"{row['train_loss']:.4f}",
            row["bytes_down"] / 1e6,
            row["bytes_up"] / 1e6,
            row["seconds"],
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.folder / "summary.md").write_text(self.table() + "\n")
        log.info("results in %s\n%s", self.folder, self.table())

    def table(self) -> str:
        """The per-round table as Markdown."""
        lines = [
            "| " + " | ".join(TABLE_COLUMNS).replace("main", self.main_metric) + " |",
            "|" + "---|" * len(TABLE_COLUMNS),
        ]
        for row in self.rows:
            train_loss = row.get("train_loss")
            lines.append(
                f"| {row['round']} | {row[f'eval_{self.main_metric}']:.4f} | {row['eval_loss']:.4f} | "
                f"{'-' if train_loss is None else f'{train_loss:.4f}'} | "
                f"{row['bytes_down'] / 1e6:.2f} | {row['bytes_up'] / 1e6:.2f} | "
                f"{row['clients_aggregated']}/{row['clients_sampled']} | {row['seconds']:.1f} |"
            )
        return "\n".join(lines)
