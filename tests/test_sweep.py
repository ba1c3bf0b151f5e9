"""The benchmark sweep: its presets compose, every grid entry is a valid experiment, finished jobs
are skipped."""

import itertools
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from finetune.config import compose_config
from launch.simulation import PROJECT_DIR
from launch.sweep import completed, job_name


def _preset(name):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_DIR / "conf" / "sweep"), version_base=None):
        cfg = compose(config_name=name, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def test_cpu_small_grid_is_every_method_on_two_datasets_and_seeds():
    from strategies import RULES

    grid = _preset("cpu_small").hydra.sweeper.params
    methods = set(grid["method"].split(","))
    assert methods <= set(RULES)  # a new rule enters a benchmark when its preset names it
    assert {RULES[m].family for m in methods} == {rule.family for rule in RULES.values()}
    assert grid["dataset"] == "sst2,rte" and grid["seed"] == "0,1"
    iid = _preset("cpu_small_iid")
    # centralized trains on the union: its IID row is the Dirichlet grid's runs, not new ones
    assert iid.partition == "iid" and iid.hydra.sweeper.params["method"] == "fedit,ffa_lora,full"


def test_every_job_of_the_grid_is_a_valid_experiment():
    preset = _preset("cpu_small")
    for method in preset.hydra.sweeper.params["method"].split(","):
        for dataset in ("sst2", "rte"):
            cfg = compose_config({"method": method, "dataset": dataset}, f"{preset.overrides} seed=1")
            assert cfg.federation.num_rounds == 10 and cfg.federation.clients_per_round(10) == 5


def test_completed_jobs_are_skipped(tmp_path):
    cfg = _preset("cpu_small")
    assert job_name(cfg) == "fedit-sst2-dirichlet-s0"
    run = tmp_path / "20261122-fedit"
    run.mkdir()
    assert not completed(tmp_path)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert completed(tmp_path)


def test_jobs_in_the_committed_records_are_skipped(tmp_path, monkeypatch):
    import launch.sweep as sweep

    records = tmp_path / "runs.jsonl"
    records.write_text(json.dumps({"job": "fedit-sst2-dirichlet-s0"}) + "\n")
    cfg = _preset("cpu_small")
    cfg.hydra = None
    cfg.results_dir, cfg.records = str(tmp_path / "results"), str(records)
    ran = []
    monkeypatch.setattr(sweep, "run_simulation", lambda *a, **k: ran.append(a))
    sweep.main.__wrapped__(cfg)
    assert ran == []
    cfg.seed = 1  # not recorded: it runs
    monkeypatch.setattr(
        sweep, "run_simulation", lambda *a, **k: ran.append(a) or type("O", (), {"status": "x"})()
    )
    sweep.main.__wrapped__(cfg)
    assert len(ran) == 1


@pytest.mark.parametrize(
    "preset",
    [
        "cpu_small",
        "cpu_small_iid",
        "gpu_paper",
        "gpu_paper_vit",
        "gpu_offline",
        "gpu_offline_vision",
        "gpu_offline_gsm8k",
    ],
)
def test_every_job_of_every_preset_composes(preset):
    cfg = _preset(preset)
    grid = {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items() if key != "seed"}
    jobs = list(itertools.product(*grid.values()))
    assert jobs
    for values in jobs:
        job = {
            "model": cfg.model,
            "dataset": cfg.dataset,
            "partition": cfg.partition,
            **dict(zip(grid, values, strict=True)),
        }
        selections = {k: job[k] for k in ("method", "model", "dataset", "partition")}
        experiment = compose_config(selections, f"{cfg.overrides} seed=1")
        assert experiment.partition.num_clients == cfg.num_supernodes, (preset, job)
