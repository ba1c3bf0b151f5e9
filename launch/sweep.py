"""Benchmark sweep: Hydra multirun over methods × datasets × partitions × seeds, one simulation per
job, resumable — a job whose results folder already holds a completed summary is skipped.

    python -m launch.sweep --config-name cpu_small          # the grid in conf/sweep/cpu_small.yaml
    python -m launch.sweep --config-name cpu_small method=fedit,full seed=0   # a sub-grid

Results: ``<results_dir>/<method>-<dataset>-<partition>-s<seed>/<run folder>/`` (config, metrics,
summary), plus ``sweep.jsonl``, one line per finished job. A preset may name ``settings`` (a
``setting`` name → its partition, extra overrides and the methods it applies to; the job is then
``<method>-<dataset>-<setting>-s<seed>``), a tuning ``stage`` (``lr_mult`` times each method's own peak
learning rate, scored on the tuning split: ``...-lr<mult>-s<seed>``) and a ``tuned`` file (written by
``python -m benchmarks.tuning``) whose chosen values the reported jobs use.

A job already in the preset's committed run records (``records``, written by
``python -m benchmarks.report``) is skipped too, so a sweep resumes from a fresh checkout. A job that
was interrupted mid-run continues from its last round's checkpoint (``resume-from``) instead of
starting again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from benchmarks.results import code_commit, read_records
from finetune.hub import default_hub_mirror
from launch.simulation import PROJECT_DIR, run_simulation
from server_app.checkpoint import round_folders

log = logging.getLogger(__name__)


def job_name(cfg: DictConfig) -> str:
    cell = cfg.get("setting") or cfg.partition
    tuning = f"-lr{float(cfg.lr_mult):g}" if cfg.get("stage") == "tune" else ""
    return f"{cfg.method}-{cfg.dataset}-{cell}{tuning}-s{cfg.seed}"


def job_overrides(cfg: DictConfig) -> tuple[str, str] | None:
    """The job's partition and its overrides beyond the preset's (its setting's, the tuning stage's
    learning rate and split, or the tuned values); None when its setting leaves the method out."""
    partition, extra = str(cfg.partition), []
    if cfg.get("setting"):
        setting = cfg.settings[cfg.setting]
        if setting.get("methods") and cfg.method not in setting.methods:
            return None
        partition = str(setting.get("partition", partition))
        extra.append(str(setting.get("overrides", "")))
    if cfg.get("stage") == "tune":
        from finetune.config import compose_config

        chosen = {"method": str(cfg.method), "dataset": str(cfg.dataset), "partition": partition}
        peak = compose_config(chosen, f"{cfg.overrides} {' '.join(extra)}").peak_lr
        extra.append(f"method.lr={peak * float(cfg.lr_mult):.6g} dataset.evaluate_on=tuning")
    elif cfg.get("tuned"):
        extra.append(tuned_overrides(PROJECT_DIR / str(cfg.tuned), str(cfg.dataset), str(cfg.method)))
    return partition, " ".join(e for e in extra if e)


def tuned_overrides(path: Path, dataset: str, method: str) -> str:
    """The values the tuning stage chose for ``method`` on ``dataset`` (``benchmarks.tuning``)."""
    if not path.is_file():
        raise SystemExit(
            f"{path}: no tuned values; run the preset's tuning stage and benchmarks.tuning first"
        )
    chosen = json.loads(path.read_text()).get(dataset, {}).get(method)
    if chosen is None:
        raise SystemExit(f"{path}: the tuning stage chose nothing for {method} on {dataset}")
    return " ".join(f"{key}={value}" for key, value in chosen["overrides"].items())


def completed(folder: Path) -> bool:
    """Whether a previous job left a completed run in ``folder``."""
    for summary in folder.glob("*/summary.json"):
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                return True
        except json.JSONDecodeError:
            continue
    return False


@hydra.main(config_path="../conf/sweep", config_name="cpu_small", version_base=None)
def main(cfg: DictConfig) -> None:
    results = Path(cfg.results_dir)
    results = (results if results.is_absolute() else PROJECT_DIR / results).resolve()
    folder = results / job_name(cfg)
    planned = job_overrides(cfg)
    if planned is None:
        log.info("%s: not part of setting %s, skipped", job_name(cfg), cfg.setting)
        return
    partition, extra = planned
    recorded = {r["job"] for r in read_records(PROJECT_DIR / cfg.records)} if cfg.get("records") else set()
    if completed(folder) or job_name(cfg) in recorded:
        log.info("%s: already completed, skipped", folder.name)
        return
    mirror = default_hub_mirror()
    run_config = None
    for stale in sorted(folder.glob("*")) if folder.exists() else []:  # an interrupted attempt
        if not stale.is_dir() or (stale / "summary.json").exists() or stale.name == "node-state":
            continue
        if run_config is None and round_folders(stale):  # continue it from its checkpoint
            log.info("%s: resuming %s", folder.name, stale.name)
            run_config = [f"resume-from='{stale}' hub-mirror='{mirror}'"]
        else:
            stale.rename(stale.with_name(stale.name + ".interrupted"))
    folder.mkdir(parents=True, exist_ok=True)
    # the job's simulated data owners get their own node state (and privacy ledgers): a sweep
    # repeats DP runs on the same partitions by design
    overrides = (
        f"{cfg.overrides} {extra} seed={cfg.seed} name={job_name(cfg)} node_state_dir={folder / 'node-state'}"
    )
    run_config = run_config or [
        f"method='{cfg.method}' model='{cfg.model}' dataset='{cfg.dataset}' partition='{partition}' "
        f"overrides='{overrides.strip()}' output-dir='{folder}' hub-mirror='{mirror}'"
    ]
    start = time.perf_counter()
    outcome = run_simulation(
        run_config,
        num_supernodes=int(cfg.num_supernodes),
        cpus_per_client=int(cfg.get("cpus_per_client", 1)),
        gpus_per_client=float(cfg.get("gpus_per_client", 0.0)),
        flwr_home=PROJECT_DIR / ".flwr-sweep",
        timeout=float(cfg.timeout_s),
        stream=False,
    )
    record = {
        "job": job_name(cfg),
        "status": outcome.status,
        "seconds": time.perf_counter() - start,
        "commit": code_commit(PROJECT_DIR),
    }
    with (results / "sweep.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    log.info("%s: %s in %.0f s", record["job"], outcome.status, record["seconds"])


if __name__ == "__main__":
    main()
