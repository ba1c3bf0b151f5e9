"""Benchmark sweep: every job of a preset's grids, one ordinary Flower run each, on one SuperLink
kept for the whole sweep; resumable, and runnable in chunks under a time budget.

    python -m launch.sweep --preset cpu_paired --budget-min 150     # a chunk; the next call resumes
    python -m launch.sweep --preset cpu_paired --dry-run            # compose + validate every job
    python -m launch.sweep --preset cpu_paired --plan               # jobs left and their measured cost
    python -m launch.sweep --preset cpu_paired --profile fedit-sst2-dir05-s0   # one job, phase by phase
    python -m launch.sweep --preset cpu_small method=fedit,full seed=0   # a sub-grid

A preset is ``conf/sweep/<preset>.yaml`` and every ``<preset>_*.yaml`` beside it (a *grid* each):
its ``hydra.sweeper.params`` span the jobs, ``settings`` name cells (a partition with its options
and the methods it applies to), a grid with ``stage: tune`` is a tuning stage (``lr_mult`` times
each method's own peak learning rate, scored on the tuning split), and the reported grids use the
values the tuning runs chose (``tuned``, written here through ``benchmarks.tuning``). Arguments
``key=a,b`` keep only those values of a grid parameter; other ``key=value`` arguments override the
preset (``records=null results_dir=<scratch folder>`` for a trial).

Order: every tuning job first (each rule of each cell at its default learning rate, then the nearer
multiples, then the farther), then the reported jobs seed by seed (every cell of seed 0, then of
seed 1, ...), so a partial sweep already answers something with paired seeds.

Each finished job's record (``benchmarks.results.run_record``, with its commit and the phases of
its wall time) goes into the grid's ``records`` file at once; commit those files after a chunk. A
job already in the records, or completed under ``results_dir``, is skipped; an interrupted one
continues from its last checkpoint. The sweep refuses to run from a tree whose code has
uncommitted changes (records from it could never be paired), unless ``--allow-dirty``.

When a cell already holds records from another commit, the cell's *fingerprint job* (its
``fingerprint_method`` at the lowest seed) is run again at this commit first and stored in
``fingerprints.jsonl``: the report pairs runs across commits only where it reproduced bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from benchmarks.pairing import is_clean
from benchmarks.results import (
    code_commit,
    merge_records,
    read_records,
    run_record,
    same_run_code,
    write_records,
)
from finetune.hub import default_hub_mirror
from launch.simulation import PROJECT_DIR, LocalSuperLink
from server_app.checkpoint import round_folders

log = logging.getLogger(__name__)

SWEEP_DIR = PROJECT_DIR / "conf" / "sweep"
#: Where records, tuned values and results go: the checkout, or (``--snapshot``) the checkout the
#: snapshot was taken from, while the jobs' code comes from the snapshot.
OUTPUT_ROOT = Path(os.environ.get("FEDSUBSPACE_SWEEP_OUTPUT") or PROJECT_DIR)
SNAPSHOTS = ".sweep-snapshots"
#: A job is started only when the budget left exceeds its estimate times this.
ESTIMATE_MARGIN = 1.15


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
        import strategies  # noqa: F401  (registers every rule's config)
        from experiment_schema import compose_config

        chosen = {"method": str(cfg.method), "model": str(cfg.model), "dataset": str(cfg.dataset)}
        peak = compose_config(
            {**chosen, "partition": partition}, f"{cfg.overrides} {' '.join(extra)}"
        ).peak_lr
        extra.append(f"method.lr={peak * float(cfg.lr_mult):.6g} dataset.evaluate_on=tuning")
    elif cfg.get("tuned"):
        extra.append(tuned_overrides(OUTPUT_ROOT / str(cfg.tuned), tuning_key(cfg), str(cfg.method)))
    return partition, " ".join(e for e in extra if e)


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


def completed(folder: Path) -> bool:
    """Whether a previous job left a completed run in ``folder``."""
    return completed_run(folder) is not None


def completed_run(folder: Path) -> Path | None:
    """The newest completed run folder in ``folder`` (attempts set aside are not runs)."""
    for summary in sorted(folder.glob("*/summary.json"), reverse=True):
        if summary.parent.suffix in (".interrupted", ".unrecorded"):
            continue
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                return summary.parent
        except json.JSONDecodeError:
            continue
    return None


# --- planning ------------------------------------------------------------------------------------


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
        base = compose_grid(grid, [])
        params = {k: str(v).split(",") for k, v in base.hydra.sweeper.params.items()}
        # a grid parameter keeps only the values given (a grid without them adds no job); any
        # other key is set on the preset
        if restrict:
            params |= {
                k: [x for x in params[k] if x in v.split(",")] for k, v in given.items() if k in params
            }
        plain = [f"{k}={v}" for k, v in given.items() if k not in params]
        OmegaConf.set_struct(base, False)
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(plain))  # type: ignore[assignment]
        OmegaConf.set_struct(base, False)
        base.pop("hydra")
        for values in itertools.product(*params.values()):
            cfg = copy.deepcopy(base)
            for key, value in zip(params, values, strict=True):
                cfg[key] = value
            if in_setting(cfg):
                (tuning if cfg.get("stage") == "tune" else reported).append((order, Job(cfg, grid)))
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


# --- measured cost -------------------------------------------------------------------------------


def job_seconds(record: dict[str, Any]) -> float:
    """What a recorded job cost end to end (older records: the run's own wall time)."""
    return float(record.get("job_seconds") or record["wall_seconds"])


def estimate(job: Job, history: list[dict[str, Any]], default: float) -> float:
    """The job's expected cost from the measured records of the most similar jobs: the same
    method in the same cell and stage, else the cell's other methods, else the dataset's."""
    model, dataset, setting = job.cell
    stage = "tune" if job.tuning else "report"
    keys = (
        lambda r: (r["method"], r["dataset"], r.get("setting"), r.get("stage", "report"), r.get("model")),
        lambda r: (r["dataset"], r.get("setting"), r.get("model")),
        lambda r: (r["dataset"], r.get("model")),
    )
    wanted = (
        (str(job.cfg.method), dataset, setting, stage, model),
        (dataset, setting, model),
        (dataset, model),
    )
    for key, target in zip(keys, wanted, strict=True):
        seen = [job_seconds(r) for r in history if key(r) == target]
        if seen:
            return float(statistics.median(seen))
    return default


# --- running -------------------------------------------------------------------------------------


class SweepRunner:
    """One simulation SuperLink for every job of a sweep; each job an ordinary Flower run of its own
    (its own ServerApp process and client actors), so nothing a job computes depends on the jobs
    before it. What the sweep saves per job is the SuperLink's start and stop, and the run status
    polls (a summary file is watched instead)."""

    def __init__(self, flwr_home: Path) -> None:
        self.superlink = LocalSuperLink(flwr_home)
        self.mirror = default_hub_mirror()

    def __enter__(self) -> SweepRunner:
        self.superlink.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.superlink.stop()

    def run(self, job: Job, extra: str, timeout: float, commit: str) -> dict[str, Any]:
        """Run ``job`` to its end at ``commit``; what it cost."""
        cfg, folder = job.cfg, job.folder
        resumed = self._resume(folder, commit)
        folder.mkdir(parents=True, exist_ok=True)
        node_state = folder / "node-state"
        if resumed is None and node_state.exists():  # a fresh attempt spends no earlier attempt's ε
            node_state.rename(folder / f"node-state.{int(time.time())}.aside")
        # the job's simulated data owners get their own node state (and privacy ledgers): a sweep
        # repeats DP runs on the same partitions by design
        overrides = f"{cfg.overrides} {extra} seed={cfg.seed} name={job.name} node_state_dir={node_state}"
        partition = job_overrides(cfg)[0]  # type: ignore[index]
        run_config = (
            [f"resume-from='{resumed}' hub-mirror='{self.mirror}'"]
            if resumed is not None
            else [
                f"method='{cfg.method}' model='{cfg.model}' dataset='{cfg.dataset}' partition='{partition}' "
                f"overrides='{overrides.strip()}' output-dir='{folder}' hub-mirror='{self.mirror}'"
            ]
        )
        federation = (
            f"num-supernodes={int(cfg.num_supernodes)} "
            f"client-resources-num-cpus={int(cfg.get('cpus_per_client', 1))} "
            f"client-resources-num-gpus={float(cfg.get('gpus_per_client', 0.0))}"
        )
        before = {p.name for p in folder.iterdir()}
        start = time.time()
        run_id = self.superlink.submit(PROJECT_DIR, run_config, federation)
        submitted = time.time()
        status = self.wait(run_id, folder, before, timeout, commit, resumed, start)
        ended = time.time()
        return {
            "job": job.name,
            "status": status,
            "job_seconds": ended - start,
            "phases": {"submit": submitted - start, "run": ended - submitted},
            "started": start,
        }

    def _resume(self, folder: Path, commit: str) -> Path | None:
        """An interrupted attempt of the same job code is continued from its checkpoint; other
        attempts are set aside."""
        resumed = None
        for stale in sorted(folder.glob("*")) if folder.exists() else []:
            if not stale.is_dir() or (stale / "summary.json").exists() or stale.name.startswith("node-state"):
                continue
            if stale.suffix in (".interrupted", ".unrecorded"):
                continue
            if (stale / "error.txt").exists():  # it failed: a new attempt starts afresh
                set_aside(stale, "interrupted")
                continue
            made_by = attempt_commit(stale)
            same_code = made_by == commit or (
                made_by is not None and same_run_code(PROJECT_DIR, made_by, commit)
            )
            if resumed is None and round_folders(stale) and same_code:
                log.info("%s: resuming %s", folder.name, stale.name)
                resumed = stale
            else:
                set_aside(stale, "interrupted")
        return resumed

    def wait(
        self,
        run_id: int,
        folder: Path,
        before: set[str],
        timeout: float,
        commit: str,
        resumed: Path | None,
        start: float,
    ) -> str:
        """The run's final status: its run folder's summary or error file ends the wait at once;
        the SuperLink is asked only every 30 s (each ask costs a CPU-second) and at the end. The
        run folder is marked with the commit as soon as it appears."""
        deadline, asked = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline:
            runs = [p for p in folder.iterdir() if p.is_dir() and p.name not in before]
            for run in runs:
                if not (run / COMMIT_MARKER).exists():
                    (run / COMMIT_MARKER).write_text(commit)
            runs += [resumed] if resumed is not None else []
            ends = [p / name for p in runs for name in ("summary.json", "error.txt")]
            if any(end.exists() and end.stat().st_mtime >= start for end in ends):
                break
            if time.monotonic() - asked > 30:
                asked = time.monotonic()
                if self.superlink.run_status(run_id).startswith("finished"):
                    break
            time.sleep(0.25)
        else:
            self.superlink.flwr("stop", str(run_id), "fedsubspace-sim")
            return f"timed out after {timeout:.0f} s"
        for _ in range(120):  # the ServerApp exits right after writing its summary
            status = self.superlink.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status


def set_aside(folder: Path, kind: str) -> Path:
    """Rename an attempt to ``<name>.<kind>`` (``<name>.<n>.<kind>`` when taken): kept, never a run."""
    target, n = folder.with_name(f"{folder.name}.{kind}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.{n}.{kind}")
    return folder.rename(target)


#: A run folder's mark of the commit whose code the sweep ran it with.
COMMIT_MARKER = "sweep-commit"


def attempt_commit(run_dir: Path) -> str | None:
    marker = run_dir / COMMIT_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def job_record(job: Job, outcome: dict[str, Any], commit: str) -> dict[str, Any] | None:
    """The committed record of a finished job: the run's compact record, its stage, its commit,
    what the whole job cost and the phases of that time."""
    run_dir = completed_run(job.folder)
    if run_dir is None:
        return None
    record = run_record(run_dir, job.name, int(job.cfg.seed), commit)
    if record is None:
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    record.update(
        model=str(job.cfg.model),
        stage="tune" if job.tuning else "report",
        job_seconds=round(outcome["job_seconds"], 2),
        phases=phases(outcome, summary, record),
    )
    return record


def phases(outcome: dict[str, Any], summary: dict[str, Any], record: dict[str, Any]) -> dict[str, float]:
    """The job's wall time split: submitting (``flwr run``), the ServerApp's start (process,
    imports), its set-up (data, model), the rounds' training (of which the first round's client
    start-up) and evaluation, and the finish (summary written to status seen)."""
    rounds = record["rounds"]
    train = sum(r.get("train_phase_seconds") or 0.0 for r in rounds)
    evaluation = sum(r.get("eval_seconds") or 0.0 for r in rounds)
    first: dict[str, Any] = next((r for r in rounds if r["round"] == 1), {})
    later = [r.get("train_phase_seconds") or 0.0 for r in rounds if r["round"] > 1]
    cold = (first.get("train_phase_seconds") or 0.0) - (statistics.median(later) if later else 0.0)
    started = summary.get("started_at") if outcome.get("started") else None
    result = {
        "submit": outcome["phases"]["submit"],
        "train": train,
        "evaluate": evaluation,
        "first_round_cold_start": max(cold, 0.0),
    }
    if started is not None:
        result["server_start"] = started - outcome["started"] - outcome["phases"]["submit"]
        result["server_setup"] = float(summary.get("setup_seconds") or 0.0)
        result["finish"] = (
            outcome["started"] + outcome["job_seconds"] - started - float(summary["wall_seconds"])
        )
    return {k: round(v, 2) for k, v in result.items()}


def append_record(path: Path, record: dict[str, Any]) -> None:
    write_records(path, merge_records(read_records(path), [record]))


@dataclass
class Budget:
    seconds: float | None
    start: float = dataclasses.field(default_factory=lambda: time.monotonic())

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def allows(self, cost: float) -> bool:
        return cost * ESTIMATE_MARGIN <= self.left()


def pending(jobs: list[Job]) -> Iterator[Job]:
    """The jobs neither in their records nor (for grids without records) completed."""
    recorded = {
        path: {r["job"] for r in read_records(path) if is_clean(r)}
        for path in {j.records for j in jobs if j.records}
    }
    for job in jobs:
        if job.records is None:
            if not completed(job.folder):
                yield job
        elif job.name not in recorded[job.records]:
            yield job


def refresh_tuned(jobs: list[Job]) -> None:
    """Add to ``tuned.json`` the choices of every cell whose tuning jobs (in ``jobs``: pass the
    whole preset's) have all been recorded (``benchmarks.tuning``); choices already there stay."""
    from benchmarks.tuning import write_tuned

    tuning = [j for j in jobs if j.tuning and j.records is not None]
    reported = next((j for j in jobs if not j.tuning and j.cfg.get("tuned")), None)
    if reported is None or not tuning:
        return
    records = [r for r in read_records(tuning[0].records) if is_clean(r)]  # type: ignore[arg-type]
    done = {r["job"] for r in records}
    cells = {tuning_key(j.cfg) for j in tuning}
    incomplete = {tuning_key(j.cfg) for j in tuning if j.name not in done}
    write_tuned(records, (OUTPUT_ROOT / str(reported.cfg.tuned)).parent, cells - incomplete)


def has_tuned(job: Job) -> bool:
    """Whether a reported job's cell and rule have a tuned choice (always, without tuning)."""
    if job.tuning or not job.cfg.get("tuned"):
        return True
    path = OUTPUT_ROOT / str(job.cfg.tuned)
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    return str(job.cfg.method) in chosen.get(tuning_key(job.cfg), {})


def cell_records(job: Job) -> list[dict[str, Any]]:
    assert job.records is not None
    return [
        r for r in read_records(job.records) if (r.get("model"), r["dataset"], r.get("setting")) == job.cell
    ]


def fingerprint_check(job: Job, commit: str) -> tuple[Job | None, bool]:
    """Before ``job`` at ``commit``: the fingerprint job still to run — a recorded job of the cell's
    paired runs (``benchmarks.pairing``), re-run here to show this commit trains like theirs — and
    whether such a re-run at this commit already failed to reproduce (then nothing of the cell may
    run)."""
    from benchmarks.pairing import admit, cell_of, equivalent_commits, fingerprint_record, is_clean

    if job.tuning or job.records is None:
        return None, False
    method = str(job.cfg.get("fingerprint_method") or "fedit")
    runs = cell_records(job)
    prints = [
        f for f in read_records(fingerprints_path(job.records)) if is_clean(f) and cell_of(f) == job.cell
    ]

    def same_code(a: str, b: str) -> bool:
        return same_run_code(PROJECT_DIR, a, b)

    paired = admit(runs, prints, method, same_code).kept
    if not paired:
        return None, False
    classes, _ = equivalent_commits([r for r in runs if is_clean(r)], prints, same_code)
    kept_class = classes[str(paired[0]["commit"])]
    if classes.get(commit) == kept_class or any(
        same_code(c, commit) for c, k in classes.items() if k == kept_class
    ):
        return None, False
    recorded = fingerprint_record(paired, method)
    assert recorded is not None
    if stored_fingerprint(job.records, recorded["job"], commit) is not None:
        return None, True  # re-run here, and it did not join the paired runs' class
    cfg = copy.deepcopy(job.cfg)
    cfg.method, cfg.seed = recorded["method"], recorded["seed"]
    return Job(cfg, job.grid), False


def stored_fingerprint(records: Path, name: str, commit: str) -> dict[str, Any] | None:
    stored = read_records(fingerprints_path(records))
    return next((r for r in stored if r["job"] == name and r.get("commit") == commit), None)


NOT_REPRODUCED = (
    "{} did not reproduce its recorded metrics at {}: this code trains differently, so its runs could "
    "not be paired with the cell's records. Restore the code, or start the preset anew in a fresh "
    "records file."
)


def append_fingerprint(path: Path, record: dict[str, Any]) -> None:
    """Fingerprints are kept per job *and* commit: a newer one never replaces an older one."""
    kept = [r for r in read_records(path) if (r["job"], r.get("commit")) != (record["job"], record["commit"])]
    write_records(path, sorted([*kept, record], key=lambda r: (r["job"], str(r.get("commit")))))


def fingerprints_path(records: Path) -> Path:
    return records.with_name("fingerprints.jsonl")


def run_sweep(
    preset: str,
    arguments: list[str],
    budget_min: float | None,
    allow_dirty: bool,
    grids: list[str] | None = None,
    flwr_home: Path | None = None,
) -> int:
    commit = code_commit(PROJECT_DIR)
    if commit.endswith("+dirty") and not allow_dirty:
        print(
            "the code has uncommitted changes: records made from it could never be paired with others. "
            "Commit first (or pass --allow-dirty for a trial whose records the report refuses).",
            file=sys.stderr,
        )
        return 2
    jobs = plan(preset, arguments, grids)
    for job in jobs:  # a bad grid fails here, before anything starts
        if job.tuning or not job.cfg.get("tuned"):
            validate(job)
    budget = Budget(None if budget_min is None else budget_min * 60.0)
    default = float(jobs[0].cfg.get("estimate_s", 300)) if jobs else 300.0
    done = skipped = 0
    with SweepRunner(flwr_home or PROJECT_DIR / ".flwr-sweep" / preset) as runner:
        tuned_ready = False
        for job in list(pending(jobs)):
            if not job.tuning and not tuned_ready:
                refresh_tuned(plan(preset, arguments, grids, restrict=False))
                tuned_ready = True
            if not has_tuned(job):
                log.warning(
                    "%s: no tuned learning rate for its cell yet (tuning incomplete), skipped", job.name
                )
                skipped += 1
                continue
            if code_commit(PROJECT_DIR) != commit:  # each job's app is packaged from this tree
                print(f"the code changed since the sweep started at {commit}; stopping", file=sys.stderr)
                return 2
            fingerprint, failed = fingerprint_check(job, commit)
            if failed:
                print(NOT_REPRODUCED.format(f"the fingerprint of {job.name}'s cell", commit), file=sys.stderr)
                return 3
            for current, is_fingerprint in ([(fingerprint, True)] if fingerprint else []) + [(job, False)]:
                history = [r for j in {x.records for x in jobs if x.records} for r in read_records(j)]
                cost = estimate(current, history, default)
                if not budget.allows(cost):
                    log.info(
                        "stopping: %s needs about %.0f s, %.0f s of the budget left",
                        current.name, cost, budget.left(),
                    )  # fmt: skip
                    print(
                        f"{done} jobs run, {skipped} failed or skipped; budget reached before {current.name}"
                    )
                    return 0
                ok = run_one(runner, current, commit, is_fingerprint, timeout=float(current.cfg.timeout_s))
                done += ok
                skipped += not ok
                if is_fingerprint and (not ok or fingerprint_check(job, commit)[1]):
                    print(NOT_REPRODUCED.format(current.name, commit), file=sys.stderr)
                    return 3
    print(
        f"{done} jobs run, {skipped} failed; the preset is complete"
        if not skipped
        else f"{done} jobs run, {skipped} failed or skipped (see the log)"
    )
    return 0 if not skipped else 1


def run_one(runner: SweepRunner, job: Job, commit: str, is_fingerprint: bool, timeout: float) -> bool:
    extra = job_overrides(job.cfg)[1]  # type: ignore[index]
    if is_fingerprint:
        job = Job(copy.deepcopy(job.cfg), job.grid)
        job.cfg.results_dir = str(job.results / "fingerprints" / commit)
    log.info("%s%s: starting", job.name, " (fingerprint)" if is_fingerprint else "")
    outcome = adopted(job) if completed(job.folder) else None
    if outcome is None:
        outcome = runner.run(job, extra, timeout, commit)
    record = job_record(job, outcome, outcome.get("commit", commit))
    job.results.mkdir(parents=True, exist_ok=True)
    with (job.results / "sweep.jsonl").open("a") as handle:
        handle.write(
            json.dumps({k: outcome[k] for k in ("job", "status", "job_seconds")} | {"commit": commit}) + "\n"
        )
    if record is None:
        log.error("%s: %s (see %s)", job.name, outcome["status"], job.folder)
        return False
    if job.records is not None:
        if is_fingerprint:
            append_fingerprint(fingerprints_path(job.records), record)
        else:
            append_record(job.records, record)
    log.info("%s: %s in %.0f s", job.name, outcome["status"], outcome["job_seconds"])
    return True


def adopted(job: Job) -> dict[str, Any] | None:
    """A job that completed under ``results_dir`` but never reached its records (the sweep was
    stopped in between): recorded with the commit its run folder was marked with, and the cost the
    sweep log gives; a run of unknown code is set aside and the job runs again."""
    run = completed_run(job.folder)
    assert run is not None
    commit = attempt_commit(run)
    current = code_commit(PROJECT_DIR)
    if commit is None or not (commit == current or same_run_code(PROJECT_DIR, commit, current)):
        set_aside(run, "unrecorded")  # unknown or other code: run it again
        return None
    log_file = job.results / "sweep.jsonl"
    logged = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    entry = next((e for e in reversed(logged) if e["job"] == job.name and e.get("commit") == commit), None)
    seconds = (
        float(entry["job_seconds"])
        if entry
        else float(json.loads((run / "summary.json").read_text())["wall_seconds"])
    )
    return {
        "job": job.name, "status": "finished:completed", "job_seconds": seconds, "commit": commit,
        "phases": {"submit": 0.0, "run": seconds}, "started": None,
    }  # fmt: skip


def print_plan(preset: str, arguments: list[str]) -> None:
    jobs = plan(preset, arguments)
    history = [r for j in {x.records for x in jobs if x.records} for r in read_records(j)]
    default = float(jobs[0].cfg.get("estimate_s", 300)) if jobs else 300.0
    left = list(pending(jobs))
    cells: dict[tuple[str, ...], list[float]] = {}
    for job in jobs:
        cells.setdefault(("tune" if job.tuning else "report", *job.cell), []).append(
            estimate(job, history, default)
        )
    total = 0.0
    print("| stage | model | dataset | setting | jobs | est. s per job (median) | est. minutes |")
    print("|---|---|---|---|---|---|---|")
    for key, costs in cells.items():
        total += sum(costs)
        print(
            f"| {' | '.join(key)} | {len(costs)} | {statistics.median(costs):.0f} | {sum(costs) / 60:.0f} |"
        )
    remaining = sum(estimate(j, history, default) for j in left)
    print(f"\n{len(jobs)} jobs, {total / 3600:.1f} h; {len(left)} left, {remaining / 3600:.1f} h")


def run_from_snapshot(argv: list[str]) -> int:
    """The sweep run from a git worktree of this commit (``.sweep-snapshots/<commit>``), writing its
    records and results here: the checkout can be edited and committed while the chunk runs."""
    commit = code_commit(PROJECT_DIR)
    if not commit or commit.endswith("+dirty"):
        print("--snapshot needs committed code: commit first", file=sys.stderr)
        return 2
    folder = PROJECT_DIR / SNAPSHOTS / commit
    for old in (PROJECT_DIR / SNAPSHOTS).glob("*") if (PROJECT_DIR / SNAPSHOTS).is_dir() else []:
        if old != folder and not snapshot_in_use(old):  # an earlier commit's, its chunk ended
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=PROJECT_DIR, check=False)
    if not folder.is_dir():
        subprocess.run(["git", "worktree", "prune"], cwd=PROJECT_DIR, check=False)
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(folder), commit], cwd=PROJECT_DIR, check=True
        )
    env = os.environ | {
        "FEDSUBSPACE_SWEEP_OUTPUT": str(OUTPUT_ROOT),
        "FEDSUBSPACE_HUB_MIRROR": os.environ.get("FEDSUBSPACE_HUB_MIRROR") or default_hub_mirror() or "",
    }
    log.info("running from the snapshot %s; records and results go to %s", folder, OUTPUT_ROOT)
    child = subprocess.Popen([sys.executable, "-m", "launch.sweep", *argv], cwd=folder, env=env)
    (folder / RUNNING).write_text(str(child.pid))
    # stopping this launcher stops the chunk (which stops its SuperLink and runs)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        (folder / RUNNING).unlink(missing_ok=True)


RUNNING = ".sweep-running"  # in a snapshot: the pid of the chunk running from it


def snapshot_in_use(folder: Path) -> bool:
    marker = folder / RUNNING
    if not marker.is_file():
        return False
    try:
        os.kill(int(marker.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", "--config-name", dest="preset", default="cpu_paired")
    parser.add_argument("--budget-min", type=float, default=None, help="stop before a job that would overrun")
    parser.add_argument("--dry-run", action="store_true", help="compose and validate every job, run none")
    parser.add_argument("--plan", action="store_true", help="print the jobs left and their measured cost")
    parser.add_argument("--profile", metavar="JOB", help="time one job phase by phase (run unless done)")
    parser.add_argument(
        "--snapshot", action="store_true", help="run from a worktree of this commit (keep editing meanwhile)"
    )
    parser.add_argument("--allow-dirty", action="store_true", help="run from uncommitted code (unpairable)")
    parser.add_argument("--grid", action="append", help="only these grid files of the preset (repeatable)")
    parser.add_argument(
        "arguments", nargs="*", help="key=a,b restricts a grid parameter; key=value overrides"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    if args.snapshot:
        return run_from_snapshot([a for a in argv if a != "--snapshot"])
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("FEDSUBSPACE_HUB_MIRROR", default_hub_mirror() or "")
    if args.dry_run:
        return dry_run(args.preset, args.arguments)
    if args.plan:
        print_plan(args.preset, args.arguments)
        return 0
    if args.profile:
        return profile(args.preset, args.profile, args.arguments)
    return run_sweep(args.preset, args.arguments, args.budget_min, args.allow_dirty, args.grid)


def profile(preset: str, name: str, arguments: list[str]) -> int:
    """One job of the preset timed phase by phase: run (and recorded) unless it already completed
    here; the table goes to ``<records folder>/profile-<job>.md``."""
    job = next((j for j in plan(preset, arguments) if j.name == name), None)
    if job is None:
        raise SystemExit(f"{preset} has no job {name!r}")
    recorded = {r["job"] for r in read_records(job.records)} if job.records else set()
    if completed_run(job.folder) is None and name in recorded:
        raise SystemExit(f"{name} is recorded but its run folder is not here: profile it where it ran")
    if completed_run(job.folder) is None:
        if code_commit(PROJECT_DIR).endswith("+dirty"):
            raise SystemExit(
                "the code has uncommitted changes: commit before profiling a job (it is recorded)"
            )
        with SweepRunner(PROJECT_DIR / ".flwr-sweep" / preset) as runner:
            refresh_tuned(plan(preset, arguments, restrict=False))
            if not run_one(runner, job, code_commit(PROJECT_DIR), False, float(job.cfg.timeout_s)):
                return 1
    record = next((r for r in read_records(job.records) if r["job"] == name), None) if job.records else None
    run_dir = completed_run(job.folder)
    assert run_dir is not None
    text = profile_markdown(name, record, run_dir)
    print(text)
    if job.records is not None:
        (job.records.parent / f"profile-{name}.md").write_text(text)
    return 0


def profile_markdown(name: str, record: dict[str, Any] | None, run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    lines = [f"# Profile of `{name}`", ""]
    if record is not None:
        lines += [
            f"Job wall time {record.get('job_seconds') or record['wall_seconds']:.1f} s at "
            f"`{record.get('commit') or 'unknown'}` (the sweep's clock; the run's own for older records).",
            "",
            "| phase | seconds |",
            "|---|---|",
            *(f"| {phase} | {seconds:.2f} |" for phase, seconds in record.get("phases", {}).items()),
            "",
        ]
    lines += [
        "| round | training | of which slowest client: process start / set-up / data | evaluation |",
        "|---|---|---|---|",
    ]
    for row in rows:
        start = [
            row.get(k) for k in ("slowest_startup_seconds", "slowest_setup_seconds", "slowest_data_seconds")
        ]
        shown = " / ".join("—" if v is None else f"{v:.2f}" for v in start)
        train, evaluation = row.get("train_phase_seconds") or 0.0, row.get("eval_seconds") or 0.0
        lines.append(f"| {row['round']} | {train:.2f} | {shown} | {evaluation:.2f} |")
    return "\n".join(lines) + "\n"


def dry_run(preset: str, arguments: list[str]) -> int:
    """Every job composed and validated, the reported ones with a placeholder tuned value."""
    jobs = plan(preset, arguments)
    for job in jobs:
        cfg = job.cfg.copy()
        cfg.tuned = None
        validate(Job(cfg, job.grid))
    print(f"{preset}: {len(jobs)} jobs compose and validate ({sum(j.tuning for j in jobs)} tuning)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
