"""Experiment trackers (``logging.tracker``): the resolved config, every round's metrics and the
final adapter or model, in TensorBoard, MLflow or Weights & Biases, beside the run folder's own
``metrics.jsonl``. Each tracker's package is imported only when it is chosen."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from experiment_schema import ExperimentConfig

log = logging.getLogger(__name__)

#: The round fields every tracker logs as metrics (besides the evaluation's ``eval_*``).
ROUND_METRICS = (
    "train_loss", "lr", "bytes_down", "bytes_up", "clients_aggregated", "dp_epsilon",
    "peak_client_memory_mb", "server_peak_rss_mb", "train_phase_seconds", "eval_seconds", "seconds",
)  # fmt: skip


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` row that a tracker shows."""
    keys = [k for k in row if k.startswith("eval_") and k != "eval_seconds"] + list(ROUND_METRICS)
    return {
        k: float(row[k]) for k in keys if isinstance(row.get(k), int | float) and not isinstance(row[k], bool)
    }


def flat_config(cfg: ExperimentConfig) -> dict[str, str]:
    """``section.key -> value`` of the resolved config (trackers' parameter tables are flat)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)

    walk("", cfg.to_dict())
    return out


class Tracker:
    """No tracker: the run folder alone."""

    def log_round(self, row: dict[str, Any]) -> None:
        """Called with every ``metrics.jsonl`` row."""

    def finish(self, summary: dict[str, Any], saved: Path | None) -> None:
        """Called once, with the run's summary and the folder of the final adapter or model."""


class TensorBoardTracker(Tracker):
    """Event files under ``<run folder>/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, cfg: ExperimentConfig, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = folder / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.directory))
        self.writer.add_text("config", "```\n" + cfg.to_yaml() + "\n```")

    def log_round(self, row: dict[str, Any]) -> None:
        for key, value in round_metrics(row).items():
            self.writer.add_scalar(key.replace("eval_", "eval/", 1), value, global_step=int(row["round"]))
        self.writer.flush()

    def finish(self, summary: dict[str, Any], saved: Path | None) -> None:
        self.writer.add_text(
            "result", f"final: {json.dumps(summary.get('final'))}; saved: {saved or 'nothing'}"
        )
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run (parameters, metrics by round, the config and the final model as artifacts)
    on ``logging.tracking_uri``, else a file store ``<run folder>/mlruns``. MLflow 3 keeps its file
    store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a local run
    sets it (a server or ``sqlite:///...`` URI is the choice for shared tracking)."""

    def __init__(self, cfg: ExperimentConfig, folder: Path) -> None:
        if not cfg.logging.tracking_uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = cfg.logging.tracking_uri or (folder / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.logging.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.logging.project)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=folder.name).info.run_id
        for key, value in flat_config(cfg).items():
            self.client.log_param(self.run_id, key, value[:6000])
        self.client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")

    def log_round(self, row: dict[str, Any]) -> None:
        for key, value in round_metrics(row).items():
            self.client.log_metric(self.run_id, key, value, step=int(row["round"]))

    def finish(self, summary: dict[str, Any], saved: Path | None) -> None:
        if saved is not None:
            self.client.log_artifacts(self.run_id, str(saved), saved.name)
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    """A Weights & Biases run, offline (``<run folder>/wandb``, ``wandb sync`` later) unless an API
    key is configured."""

    def __init__(self, cfg: ExperimentConfig, folder: Path) -> None:
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logging.project, name=folder.name, config=cfg.to_dict(), dir=str(folder), mode=mode
        )

    def log_round(self, row: dict[str, Any]) -> None:
        self.run.log(round_metrics(row), step=int(row["round"]))

    def finish(self, summary: dict[str, Any], saved: Path | None) -> None:
        if saved is not None:
            artifact = self.wandb.Artifact(f"{self.run.name}-{saved.name}", type="model")
            artifact.add_dir(str(saved))
            self.run.log_artifact(artifact)
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {
    "none": Tracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


def open_tracker(cfg: ExperimentConfig, folder: Path) -> Tracker:
    kind = cfg.logging.tracker
    if kind == "none":
        return Tracker()
    tracker = TRACKERS[kind](cfg, folder)  # type: ignore[call-arg]
    log.info("tracking with %s", kind)
    return tracker


def tracker_package(kind: str) -> str | None:
    """The package a tracker needs, or None (``none``): checked before a run starts."""
    return {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}.get(kind)
