"""The jobs of a sweep preset's grids: their names, their overrides (a setting's, the tuning stage's
or the tuned values), their run order, and the check that each composes as its ServerApp would."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from launch.simulation import PROJECT_DIR

SWEEP_DIR = PROJECT_DIR / "conf" / "sweep"
#: Where records, tuned values and results go: the checkout, or (``--snapshot``) the checkout the
#: snapshot was taken from, while the jobs' code comes from the snapshot.
OUTPUT_ROOT = Path(os.environ.get("FEDSUBSPACE_SWEEP_OUTPUT") or PROJECT_DIR)


def job_name(cfg: DictConfig) -> str:
    cell = cfg.get("setting") or cfg.partition
    tuning = f"-lr{float(cfg.lr_mult):g}" if cfg.get("stage") == "tune" else ""
    return f"{cfg.method}-{cfg.dataset}-{cell}{tuning}-s{cfg.seed}"


def in_setting(cfg: DictConfig) -> bool:
    """Whether the job's setting applies to its method and dataset."""
    if not cfg.get("setting"):
        return True
    setting = cfg.settings[cfg.setting]
    methods, datasets = setting.get("methods"), setting.get("datasets")
    return (not methods or cfg.method in methods) and (not datasets or cfg.dataset in datasets)


def tuning_key(cfg: DictConfig) -> str:
    """Where the tuned values of the job's cell are kept: ``<dataset>/<setting>``, or the setting
    whose tuning it borrows (``tuned_as``)."""
    setting = cfg.get("setting") or str(cfg.partition)
    borrowed = (
        cfg.settings[setting].get("tuned_as") if cfg.get("settings") and setting in cfg.settings else None
    )
    return f"{cfg.dataset}/{borrowed or setting}"


def tuned_file(cfg: DictConfig) -> Path:
    """The file of tuned values a reported job's grid names (``tuned``)."""
    return OUTPUT_ROOT / str(cfg.tuned)


def job_overrides(cfg: DictConfig) -> tuple[str, str] | None:
    """The job's partition and its overrides beyond the preset's (its setting's, the tuning stage's
    learning rate and split, or the tuned values); None when its setting leaves the method out."""
    if not in_setting(cfg):
        return None
    partition, extra = str(cfg.partition), []
    if cfg.get("setting"):
        setting = cfg.settings[cfg.setting]
        partition = str(setting.get("partition", partition))
        extra.append(str(setting.get("overrides", "")))
    if cfg.get("stage") == "tune":
        extra.append(tuning_overrides(cfg, partition, " ".join(extra)))
    elif cfg.get("tuned"):
        extra.append(tuned_overrides(tuned_file(cfg), tuning_key(cfg), str(cfg.method)))
    return partition, " ".join(e for e in extra if e)


def tuning_overrides(cfg: DictConfig, partition: str, setting_overrides: str) -> str:
    """A tuning job's learning rate (``lr_mult`` times its rule's own peak) and tuning split."""
    import strategies  # noqa: F401  (registers every rule's config)
    from experiment_schema import compose_config

    chosen = {"method": str(cfg.method), "model": str(cfg.model), "dataset": str(cfg.dataset)}
    peak = compose_config({**chosen, "partition": partition}, f"{cfg.overrides} {setting_overrides}").peak_lr
    return f"method.lr={peak * float(cfg.lr_mult):.6g} dataset.evaluate_on=tuning"


def tuned_overrides(path: Path, cell: str, method: str) -> str:
    """The values the tuning stage chose for ``method`` in ``cell`` (``benchmarks.tuning``)."""
    if not path.is_file():
        raise SystemExit(
            f"{path}: no tuned values; run the preset's tuning stage and benchmarks.tuning first"
        )
    chosen = json.loads(path.read_text()).get(cell, {}).get(method)
    if chosen is None:
        raise SystemExit(f"{path}: the tuning stage chose nothing for {method} in {cell}")
    return " ".join(f"{key}={value}" for key, value in chosen["overrides"].items())


@dataclass
class Job:
    """One run of a grid: the grid's preset composed with this job's parameter values."""

    cfg: DictConfig
    grid: str

    @property
    def name(self) -> str:
        return job_name(self.cfg)

    @property
    def tuning(self) -> bool:
        return self.cfg.get("stage") == "tune"

    @property
    def cell(self) -> tuple[str, str, str]:
        return str(self.cfg.model), str(self.cfg.dataset), str(self.cfg.get("setting") or self.cfg.partition)

    @property
    def results(self) -> Path:
        path = Path(str(self.cfg.results_dir))
        return (path if path.is_absolute() else OUTPUT_ROOT / path).resolve()

    @property
    def records(self) -> Path | None:
        return OUTPUT_ROOT / str(self.cfg.records) if self.cfg.get("records") else None

    @property
    def folder(self) -> Path:
        return self.results / self.name

    @property
    def tuned_file(self) -> Path:
        return tuned_file(self.cfg)


def preset_grids(preset: str) -> list[str]:
    """The grid files of a preset: ``<preset>.yaml`` and ``<preset>_*.yaml``."""
    if not (SWEEP_DIR / f"{preset}.yaml").is_file():
        raise SystemExit(f"no preset {preset!r} in {SWEEP_DIR}")
    return [preset, *(p.stem for p in sorted(SWEEP_DIR.glob(f"{preset}_*.yaml")))]


def compose_grid(grid: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(SWEEP_DIR), version_base=None):
        cfg = compose(config_name=grid, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def grid_jobs(grid: str, given: dict[str, str], restrict: bool) -> list[Job]:
    """Every job of one grid whose setting applies to it, in the grid's order. A grid parameter keeps
    only the values ``given`` (a grid without them adds no job) when ``restrict``; any other key is
    set on the preset."""
    base = compose_grid(grid, [])
    params = {k: str(v).split(",") for k, v in base.hydra.sweeper.params.items()}
    if restrict:
        params |= {k: [x for x in params[k] if x in v.split(",")] for k, v in given.items() if k in params}
    plain = [f"{k}={v}" for k, v in given.items() if k not in params]
    OmegaConf.set_struct(base, False)
    base = OmegaConf.merge(base, OmegaConf.from_dotlist(plain))  # type: ignore[assignment]
    OmegaConf.set_struct(base, False)
    base.pop("hydra")
    jobs = []
    for values in itertools.product(*params.values()):
        cfg = copy.deepcopy(base)
        for key, value in zip(params, values, strict=True):
            cfg[key] = value
        if in_setting(cfg):
            jobs.append(Job(cfg, grid))
    return jobs


def plan(
    preset: str,
    arguments: list[str] = (),  # type: ignore[assignment]
    grids: list[str] | None = None,
    restrict: bool = True,
) -> list[Job]:
    """Every job of the preset's grids (or of ``grids`` among them), in run order (tuning first,
    then seed by seed); ``restrict=False`` ignores the arguments that keep only some values of a
    grid parameter (the whole preset, with the other arguments)."""
    given = dict(a.split("=", 1) for a in arguments)
    tuning: list[tuple[int, Job]] = []
    reported: list[tuple[int, Job]] = []
    for order, grid in enumerate(preset_grids(preset)):
        if grids and grid not in grids:
            continue
        for job in grid_jobs(grid, given, restrict):
            (tuning if job.tuning else reported).append((order, job))
    # tuning: every rule of every cell at its default learning rate first, then the nearest
    # multiples (so every cell's cost is measured early, and a partial stage already compares);
    # reported jobs seed by seed. Both stable: grid order within a pass.
    tuning.sort(key=lambda item: (round(abs(math.log10(float(item[1].cfg.lr_mult))), 3), item[0]))
    reported.sort(key=lambda item: (int(item[1].cfg.seed), item[0]))
    return [job for _, job in tuning] + [job for _, job in reported]


def validate(job: Job) -> str:
    """Compose and validate the job's experiment as its ServerApp would; its overrides."""
    import strategies  # noqa: F401  (registers every rule's config)
    from experiment_schema import compose_config

    planned = job_overrides(job.cfg)
    assert planned is not None
    partition, extra = planned
    selections = {k: str(job.cfg[k]) for k in ("method", "model", "dataset")} | {"partition": partition}
    experiment = compose_config(selections, f"{job.cfg.overrides} {extra} seed={job.cfg.seed}")
    if experiment.partition.num_clients != int(job.cfg.num_supernodes):
        raise SystemExit(
            f"{job.grid}: {job.name} has partition.num_clients={experiment.partition.num_clients} but "
            f"num_supernodes={job.cfg.num_supernodes}: every simulated node holds one partition"
        )
    return extra


def dry_run(preset: str, arguments: list[str]) -> int:
    """Every job composed and validated, the reported ones with a placeholder tuned value."""
    jobs = plan(preset, arguments)
    for job in jobs:
        cfg = job.cfg.copy()
        cfg.tuned = None
        validate(Job(cfg, job.grid))
    print(f"{preset}: {len(jobs)} jobs compose and validate ({sum(j.tuning for j in jobs)} tuning)")
    return 0
