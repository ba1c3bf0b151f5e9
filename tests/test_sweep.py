"""The benchmark sweep: its presets compose, every grid entry is a valid experiment, finished jobs
are skipped."""

import json

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
    from strategies import STRATEGIES

    grid = _preset("cpu_small").hydra.sweeper.params
    assert set(grid["method"].split(",")) == set(STRATEGIES)
    assert grid["dataset"] == "sst2,rte" and grid["seed"] == "0,1"
    iid = _preset("cpu_small_iid")
    assert iid.partition == "iid" and iid.hydra.sweeper.params["method"] == "fedit,ffa_lora,full,centralized"


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
