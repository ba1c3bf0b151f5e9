"""The chunked sweep: run order, the time budget, refusing uncommitted or changing code, the
fingerprint re-run across commits, and a job's metrics alone and inside a sweep."""

import json
import os
from pathlib import Path

import pytest

import launch.sweep as sweep
import launch.sweep_chunk as sweep_chunk
import launch.sweep_cost as sweep_cost
import launch.sweep_plan as sweep_plan
import launch.sweep_runner as sweep_runner
import launch.sweep_snapshot as sweep_snapshot
from benchmarks.results import read_records

GRID = ["cpu_paired"]


def _arguments(tmp_path, methods="fedit,ffa_lora", seeds="0,1"):
    return [
        f"records={tmp_path / 'runs.jsonl'}", f"results_dir={tmp_path / 'results'}", "tuned=null",
        f"method={methods}", f"seed={seeds}",
    ]  # fmt: skip


def test_tuning_jobs_come_first_then_every_cell_seed_by_seed():
    jobs = sweep.plan("cpu_paired", ["method=fedit,ffa_lora", "seed=0,1"])
    names = [job.name for job in jobs]
    tuning = [job for job in jobs if job.tuning]
    assert names[: len(tuning)] == [job.name for job in tuning]
    reported = [job for job in jobs if not job.tuning]
    seeds = [int(job.cfg.seed) for job in reported]
    assert seeds == sorted(seeds)  # seed 0 of every cell before any seed 1
    cells = {job.cell for job in reported if int(job.cfg.seed) == 0}
    assert ("efficientnet_lite0", "cifar10", "vision_shift") in cells and ("minilm", "sst2", "dir05") in cells
    assert "fedit-sst2-dir05-lr0.1-s0" in names  # C2's wider tuning grid
    # every tuning cell at the default learning rate before any other multiple
    first = [job.name for job in tuning[:4]]
    assert first == [f"{m}-{c}-lr1-s0" for m, c in (("fedit", "sst2-dir05"), ("ffa_lora", "sst2-dir05"))] + [
        f"{m}-{c}-lr1-s0" for m, c in (("fedit", "sst2-dp8"), ("ffa_lora", "sst2-dp8"))
    ]
    assert {float(job.cfg.lr_mult) for job in tuning[-4:]} == {0.1, 10.0}  # the farthest last


class FakeRunner:
    def __init__(self, flwr_home):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Ran(list):
    clock: dict


@pytest.fixture
def fake_sweep(monkeypatch, tmp_path):
    """A sweep whose jobs take 100 s of a fake clock and record that cost."""
    clock = {"now": 0.0, "fingerprint_metric": 0.5}
    ran = Ran()

    def run_one(runner, job, commit, is_fingerprint, timeout):
        metric = clock["fingerprint_metric"] if is_fingerprint else 0.5
        clock["now"] += 100.0
        ran.append((job.name, is_fingerprint))
        record = {
            "job": job.name, "method": str(job.cfg.method), "dataset": "sst2", "setting": "dir05",
            "partition": "dirichlet", "model": "minilm", "stage": "report", "seed": int(job.cfg.seed),
            "commit": commit, "job_seconds": 100.0, "rounds": [{"round": 1, "metric": metric}],
        }  # fmt: skip
        if is_fingerprint:
            sweep.append_fingerprint(sweep.fingerprints_path(job.records), record)
        else:
            sweep.append_record(job.records, record)
        return True

    monkeypatch.setattr(sweep_cost.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(sweep_chunk, "SweepRunner", FakeRunner)
    monkeypatch.setattr(sweep_chunk, "run_one", run_one)
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: "aaaa")
    ran.clock = clock
    return ran


def test_the_budget_stops_before_a_job_that_would_overrun(fake_sweep, tmp_path, capsys):
    # 250 s: the first job (no measurement yet: the preset's 150 s estimate) and the second (the
    # first one's measured 100 s) fit; the third would need 100 s × margin with 50 s left
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path), 250 / 60, False, GRID) == 0
    assert [name for name, _ in fake_sweep] == ["fedit-sst2-dir05-s0", "ffa_lora-sst2-dir05-s0"]
    assert "budget reached before fedit-sst2-dir05-s1" in capsys.readouterr().out
    # the next call resumes where this one stopped
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path), None, False, GRID) == 0
    assert [name for name, _ in fake_sweep][2:] == ["fedit-sst2-dir05-s1", "ffa_lora-sst2-dir05-s1"]


def test_a_tree_with_uncommitted_code_runs_nothing(fake_sweep, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: "aaaa+dirty")
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path), None, False, GRID) == 2
    assert fake_sweep == [] and "uncommitted changes" in capsys.readouterr().err


def test_code_that_changes_during_a_sweep_stops_it(fake_sweep, monkeypatch, tmp_path, capsys):
    commits = iter(["aaaa", "aaaa", "bbbb"])  # the start, the first job, then an edit
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: next(commits))
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path), None, False, GRID) == 2
    assert len(fake_sweep) == 1 and "code changed" in capsys.readouterr().err


def test_a_new_commit_reruns_the_cells_fingerprint_job_first(fake_sweep, monkeypatch, tmp_path):
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0"), None, False, GRID) == 0
    assert fake_sweep == [("fedit-sst2-dir05-s0", False), ("ffa_lora-sst2-dir05-s0", False)]
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: "bbbb")
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path), None, False, GRID) == 0
    # fedit at the lowest seed is the cell's fingerprint: re-run once at bbbb, then the new jobs
    assert fake_sweep[2:] == [
        ("fedit-sst2-dir05-s0", True), ("fedit-sst2-dir05-s1", False), ("ffa_lora-sst2-dir05-s1", False),
    ]  # fmt: skip
    stored = read_records(tmp_path / "fingerprints.jsonl")
    assert [(r["job"], r["commit"]) for r in stored] == [("fedit-sst2-dir05-s0", "bbbb")]


def test_a_fingerprint_that_does_not_reproduce_stops_the_sweep(fake_sweep, monkeypatch, tmp_path, capsys):
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0"), None, False, GRID) == 0
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: "bbbb")
    fake_sweep.clock["fingerprint_metric"] = 0.51  # the new code trains differently
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path), None, False, GRID) == 3
    assert fake_sweep[2:] == [("fedit-sst2-dir05-s0", True)]  # no new job ran after it
    assert "did not reproduce" in capsys.readouterr().err


def test_fingerprints_are_kept_per_commit_and_a_failed_one_keeps_stopping_the_cell(
    fake_sweep, monkeypatch, tmp_path, capsys
):
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0"), None, False, GRID) == 0
    for commit in ("bbbb", "cccc"):
        monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder, commit=commit: commit)
        assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0,1,2"), 200 / 60, False, GRID) == 0
    stored = read_records(tmp_path / "fingerprints.jsonl")
    assert [(r["job"], r["commit"]) for r in stored] == [("fedit-sst2-dir05-s0", c) for c in ("bbbb", "cccc")]
    # a later commit whose fingerprint does not reproduce stops this and every later call
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: "dddd")
    fake_sweep.clock["fingerprint_metric"] = 0.51
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0,1,2"), None, False, GRID) == 3
    ran = len(fake_sweep)
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0,1,2"), None, False, GRID) == 3
    assert len(fake_sweep) == ran  # nothing ran at dddd after the failed fingerprint
    assert "did not reproduce" in capsys.readouterr().err


def test_the_fingerprint_is_the_recorded_reference_even_when_the_plan_leaves_it_out(
    fake_sweep, monkeypatch, tmp_path
):
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, seeds="0"), None, False, GRID) == 0
    monkeypatch.setattr(sweep_chunk, "code_commit", lambda folder: "bbbb")
    assert sweep.run_sweep("cpu_paired", _arguments(tmp_path, "ffa_lora", "1"), None, False, GRID) == 0
    assert fake_sweep[2:] == [("fedit-sst2-dir05-s0", True), ("ffa_lora-sst2-dir05-s1", False)]


def test_the_measured_cost_of_the_most_similar_jobs_is_the_estimate():
    job = sweep.plan("cpu_paired", ["method=full", "seed=0"], GRID)[0]

    def rec(method, setting, seconds):
        return {
            "method": method,
            "dataset": "sst2",
            "setting": setting,
            "model": "minilm",
            "job_seconds": seconds,
        }

    assert sweep.estimate(job, [], 150.0) == 150.0
    assert sweep.estimate(job, [rec("fedit", "dir05", 90), rec("ffa_lora", "dir05", 110)], 150.0) == 100
    history = [rec("fedit", "dir05", 90), rec("full", "dir05", 130), rec("full", "dir05", 140)]
    assert sweep.estimate(job, history, 150.0) == 135
    # a contended job's wall time overstates its cost: the same rule's quiet tuning job counts first
    contended = [
        rec("full", "dir05", 400) | {"contended": True},
        rec("full", "dir05", 120) | {"stage": "tune"},
    ]
    assert sweep.estimate(job, contended, 150.0) == 120
    assert sweep.estimate(job, contended[:1], 150.0) == 400  # nothing quiet: the contended figure


def test_a_record_says_whether_other_work_shared_the_machine(monkeypatch):
    from launch import sweep_records

    monkeypatch.setattr(sweep_records.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sweep_records.os, "getloadavg", lambda: (2.2, 2.0, 2.0))
    assert sweep_records.machine_load() == {"load_1m": 2.2, "cores": 2, "contended": False}
    monkeypatch.setattr(sweep_records.os, "getloadavg", lambda: (4.1, 3.0, 2.0))
    assert sweep_records.machine_load()["contended"]


@pytest.mark.e2e
def test_a_job_gives_the_same_metrics_alone_and_inside_a_sweep(tmp_path):
    """Real runs (tiny model): a sweep of two jobs on one SuperLink, then the second job alone."""
    overrides = (
        "overrides='federation.num_rounds=2 federation.fraction_train=0.4 train.local_steps=2 "
        "save_adapter=false partition.seed=${seed} dataset.max_eval_examples=64'"
    )

    def run(folder, methods):
        # one Ray actor for the two nodes (each actor imports the client stack)
        arguments = [*_arguments(folder, methods, "0"), "model=tiny_bert", "cpus_per_client=2", overrides]
        assert sweep.run_sweep("cpu_paired", arguments, None, True, GRID, flwr_home=folder / "flwr") == 0
        return {r["job"]: r for r in read_records(folder / "runs.jsonl")}

    together = run(tmp_path / "sweep", "fedit,ffa_lora")
    alone = run(tmp_path / "alone", "ffa_lora")
    job = "ffa_lora-sst2-dir05-s0"
    keys = ("round", "metric", "eval_loss", "train_loss", "bytes_down", "bytes_up")
    assert [[row[k] for k in keys] for row in together[job]["rounds"]] == [
        [row[k] for k in keys] for row in alone[job]["rounds"]
    ]
    assert together[job]["phases"]["train"] > 0 and set(together) == {job, "fedit-sst2-dir05-s0"}
    assert json.dumps(alone[job]["rounds"][-1]["metric"]) != "null"


def test_a_profile_lists_every_phase_and_each_rounds_training_and_evaluation(tmp_path):
    rows = [
        {"round": 0, "eval_seconds": 1.5},
        {
            "round": 1,
            "train_phase_seconds": 13.0,
            "slowest_startup_seconds": 4.0,
            "slowest_data_seconds": 0.5,
        },
        {"round": 2, "train_phase_seconds": 7.0, "eval_seconds": 1.25},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"job_seconds": 40.0, "commit": "abc", "phases": {"submit": 0.9, "server_start": 7.7}}
    text = sweep.profile_markdown("fedit-sst2-dir05-s0", record, tmp_path)
    assert "| server_start | 7.70 |" in text and "Job wall time 40.0 s at `abc`" in text
    assert "| 1 | 13.00 | 4.00 / — / 0.50 | 0.00 |" in text and "| 2 | 7.00 | — / — / — | 1.25 |" in text


def test_a_snapshot_sweep_runs_from_a_worktree_of_the_commit_and_writes_here(monkeypatch, tmp_path):
    calls = []

    class FakeChild:
        pid = os.getpid()  # alive while the chunk "runs"

        def __init__(self, command, cwd, env):
            calls.append(("popen", command, cwd, env, (cwd / sweep.RUNNING).exists()))

        def wait(self):
            calls.append(("in use", sweep.snapshot_in_use(folder)))
            return 0

    def run(command, **kw):
        calls.append(("run", command))
        if command[:3] == ["git", "worktree", "add"]:
            Path(command[4]).mkdir(parents=True)

    monkeypatch.setattr(sweep_snapshot, "PROJECT_DIR", tmp_path)
    monkeypatch.setattr(sweep_snapshot, "OUTPUT_ROOT", tmp_path)
    monkeypatch.setattr(sweep_snapshot, "code_commit", lambda folder: "abc123")
    monkeypatch.setattr(sweep_snapshot.subprocess, "run", run)
    monkeypatch.setattr(sweep_snapshot.subprocess, "Popen", FakeChild)
    earlier = tmp_path / sweep.SNAPSHOTS / "old999"
    earlier.mkdir(parents=True)  # an earlier chunk's snapshot, still running: kept
    (earlier / sweep.RUNNING).write_text(str(os.getpid()))
    folder = tmp_path / sweep.SNAPSHOTS / "abc123"
    assert sweep.main(["--snapshot", "--preset", "cpu_paired", "--budget-min", "5"]) == 0
    assert ("run", ["git", "worktree", "add", "--detach", str(folder), "abc123"]) in calls
    assert not any(c[0] == "run" and "remove" in c[1] for c in calls)
    _, command, cwd, env, _ = next(c for c in calls if c[0] == "popen")
    assert cwd == folder and command[-4:] == ["--preset", "cpu_paired", "--budget-min", "5"]
    assert env["FEDSUBSPACE_SWEEP_OUTPUT"] == str(tmp_path)
    assert ("in use", True) in calls and not sweep.snapshot_in_use(folder)  # marked while it ran
    (earlier / sweep.RUNNING).write_text("999999999")  # its chunk has ended: removed next time
    assert sweep.main(["--snapshot", "--preset", "cpu_paired"]) == 0
    assert ("run", ["git", "worktree", "remove", "--force", str(earlier)]) in calls
    monkeypatch.setattr(sweep_snapshot, "code_commit", lambda folder: "abc123+dirty")
    assert sweep.main(["--snapshot"]) == 2


def test_records_and_results_go_to_the_output_root(monkeypatch, tmp_path):
    monkeypatch.setattr(sweep_plan, "OUTPUT_ROOT", tmp_path)
    job = sweep.plan("cpu_paired", ["method=fedit", "seed=0"], GRID)[0]
    assert job.records == tmp_path / "docs/results/cpu-paired/runs.jsonl"
    assert job.folder == tmp_path / "results/cpu-paired/fedit-sst2-dir05-s0"


def test_an_interrupted_attempt_resumes_only_under_the_same_job_code(monkeypatch, tmp_path):
    from server_app.checkpoint import PREFIX, checkpoint_root

    runner = sweep.SweepRunner.__new__(sweep.SweepRunner)
    runner.mirror = ""
    for name, commit in (("a-same", "c1"), ("b-other", "c0"), ("c-unmarked", None)):
        attempt = tmp_path / name
        (checkpoint_root(attempt) / f"{PREFIX}2").mkdir(parents=True)
        if commit:
            (attempt / sweep.COMMIT_MARKER).write_text(commit)
    monkeypatch.setattr(sweep_runner, "same_run_code", lambda folder, a, b: False)
    assert runner._resume(tmp_path, "c1") == tmp_path / "a-same"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-same",
        "b-other.interrupted",
        "c-unmarked.interrupted",
    ]


def test_a_completed_run_is_adopted_only_under_the_job_code_it_was_marked_with(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_plan, "OUTPUT_ROOT", tmp_path)
    job = sweep.plan("cpu_paired", ["method=fedit", "seed=0"], GRID)[0]
    run = job.folder / "20261206-fedit"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "wall_seconds": 90.0}))
    assert sweep.adopted(job) is None and (job.folder / "20261206-fedit.unrecorded").is_dir()  # unmarked
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "wall_seconds": 90.0}))
    (run / sweep.COMMIT_MARKER).write_text("c7")
    monkeypatch.setattr(sweep_runner, "code_commit", lambda folder: "c7")
    outcome = sweep.adopted(job)
    assert outcome is not None and outcome["commit"] == "c7" and outcome["job_seconds"] == 90.0
    monkeypatch.setattr(sweep_runner, "code_commit", lambda folder: "c8")  # other job code: run it again
    monkeypatch.setattr(sweep_runner, "same_run_code", lambda folder, a, b: False)
    assert sweep.adopted(job) is None and not run.exists()


def test_a_reported_job_without_a_tuned_choice_is_skipped_not_fatal(fake_sweep, tmp_path, capsys):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"sst2/dir05": {"fedit": {"overrides": {"method.lr": 0.004}}}}))
    arguments = [a for a in _arguments(tmp_path, seeds="0") if a != "tuned=null"] + [f"tuned={tuned}"]
    assert sweep.run_sweep("cpu_paired", arguments, None, False, GRID) == 1  # one job skipped
    assert fake_sweep == [("fedit-sst2-dir05-s0", False)]
