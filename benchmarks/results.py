"""Benchmark results as compact records: one JSON line per finished run, free of machine paths,
kept in ``docs/results/<preset>/runs.jsonl`` so that a report can be rebuilt (and a sweep resumed)
from a fresh checkout.

A record holds what the report needs: the run's coordinates (method, dataset, partition, seed),
its main metric, per-round metric, bytes and timings, and the commit of the code that produced it.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from server_app.results import RoundRecord

log = logging.getLogger(__name__)

CODE_PATHS = (
    "finetune",
    "strategies",
    "server_app",
    "client_app",
    "launch",
    "benchmarks",
    "conf",
    "pyproject.toml",
)


#: The code a benchmark job runs (its app, its launch and its configs): two commits that differ
#: elsewhere (reports, tests, docs) train identically.
RUN_CODE_PATHS = (
    "experiment_schema",
    "finetune",
    "strategies",
    "server_app",
    "client_app",
    "launch",
    "conf",
    "pyproject.toml",
)


def same_run_code(folder: Path, a: str, b: str) -> bool:
    """Whether commits ``a`` and ``b`` hold the same job code (False when git cannot tell)."""
    try:
        result = subprocess.run(
            ["git", "diff", "--quiet", a, b, "--", *RUN_CODE_PATHS],
            cwd=folder,
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    return result.returncode == 0


def code_commit(folder: Path) -> str:
    """The commit of the code in ``folder`` (``+dirty`` when its code has uncommitted changes), or ''."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def chance_level(config: dict[str, Any]) -> dict[str, Any] | None:
    """The accuracy a model that learned nothing scores on the run's evaluation (always answering
    the commonest label of the seeded subset the server scored, or of each client's own share where
    the rule evaluates personalised models), and how many examples that evaluation has. None for
    tasks without labels, or where the data is not available here."""
    if not config.get("dataset"):
        return None
    setting = config.get("hub_mirror") or ""
    mirror = setting if Path(setting).is_dir() else ""  # a run folder from another machine
    return _chance_level(json.dumps({**config, "hub_mirror": mirror}, sort_keys=True))


@functools.cache
def _chance_level(config_json: str) -> dict[str, Any] | None:
    from experiment_schema import ConfigError, ExperimentConfig
    from finetune.data import DataNotFoundError, PartitionedDataset, load_eval_split, load_train_split
    from finetune.hub import default_hub_mirror, hub_mirror
    from strategies import RULES

    config = json.loads(config_json)
    config.pop("output_dir", None)
    try:
        cfg = ExperimentConfig.from_dict(config)
    except ConfigError as error:
        log.warning("no chance level: %s", error)
        return None
    mirror = hub_mirror(cfg.hub_mirror or default_hub_mirror())
    if not cfg.dataset.is_classification or mirror is None:
        return None  # without a mirror, do not stall a report on Hub downloads
    label = cfg.dataset.label_field
    try:
        evaluated = load_eval_split(cfg.dataset, mirror, cfg.seed)
        shares = [evaluated]
        rule = RULES.get(cfg.method.name)
        if rule is not None and rule.personalised:
            train = load_train_split(cfg.dataset, mirror, cfg.seed)
            shares = PartitionedDataset(train, cfg).shares_of(evaluated)
    except DataNotFoundError as error:
        log.warning("no chance level for %s: %s", cfg.dataset.name, error)
        return None
    counts = [np.bincount(np.asarray(share[label]), minlength=cfg.dataset.num_labels) for share in shares]
    examples = int(sum(c.sum() for c in counts))
    return {"eval_examples": examples, "majority_rate": sum(int(c.max()) for c in counts) / examples}


def setting_of(job: str, partition: str) -> str:
    """The cell a sweep job belongs to: ``<method>-<dataset>-<setting>[-lr<mult>]-s<seed>``."""
    parts = job.rsplit("-s", 1)[0].split("-")
    return parts[2] if len(parts) >= 3 else partition


def run_record(run_dir: Path, job: str, seed: int, commit: str = "") -> dict[str, Any] | None:
    """The compact record of a completed run folder, None when it did not complete."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        return None
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    main = summary["main_metric"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rounds = [RoundRecord.from_row(row).compact(main) for row in rows]
    return {
        "job": job,
        "method": summary["method"],
        "model": summary["model"],
        "dataset": summary["dataset"],
        "partition": summary["partition"],
        "setting": setting_of(job, summary["partition"]),
        "seed": seed,
        "main_metric": main,
        "num_clients": summary["num_clients"],
        "clients_per_round": rows[-1].get("clients_sampled") if rows else None,
        "local_steps": config["train"]["local_steps"],
        "lr": config["method"].get("lr") or config["train"]["lr"],
        "chance": chance_level(config),
        "wall_seconds": summary["wall_seconds"],
        "commit": commit,
        "rounds": rounds,
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge_records(existing: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by job, a newer record of a job replacing the older; sorted by job."""
    by_job = {record["job"]: record for record in existing}
    by_job.update({record["job"]: record for record in new})
    return [by_job[job] for job in sorted(by_job)]


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
