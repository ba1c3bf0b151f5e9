"""The benchmark sweep: its presets compose, every grid entry is a valid experiment, finished jobs
are skipped."""

import itertools
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from experiment_schema import compose_config
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


@pytest.mark.parametrize(
    "preset",
    ["cpu_small", "gpu_paper", "gpu_offline"],  # each with its grids (cpu_small_iid, gpu_paper_vit, ...)
)
def test_every_job_of_every_preset_composes_and_validates(preset):
    """The dry run composes and validates every job as its ServerApp would, starting nothing: the
    GPU presets stay runnable on a user's GPU machine."""
    from launch.sweep import dry_run

    assert dry_run(preset, []) == 0


PAIRED = (
    "cpu_paired",
    "cpu_paired_vision",
    "cpu_paired_tune_edge",
    "cpu_paired_tune_edge_vision",
    "cpu_paired_tune",
    "cpu_paired_tune_c2",
    "cpu_paired_tune_dp",
    "cpu_paired_tune_vision",
)


def _tuned_file(tmp_path):
    from strategies import RULES

    cells = ("sst2/dir05", "sst2/dp8", "cifar10/vision_dir05")
    chosen = {c: {m: {"overrides": {"method.lr": 0.002}} for m in RULES} for c in cells}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(chosen))
    return path


@pytest.mark.parametrize("preset", PAIRED)
def test_every_job_of_the_paired_presets_is_a_valid_experiment_with_its_setting(preset, tmp_path):
    from launch.sweep import job_overrides

    cfg = _preset(preset)
    cfg.hydra = None
    cfg.tuned = str(_tuned_file(tmp_path))
    grid = {k: str(v).split(",") for k, v in _preset(preset).hydra.sweeper.params.items() if k != "seed"}
    if "tune" in preset:  # every multiplier of two rules (the rest compose alike)
        grid["method"] = [m for m in ("fedit", "full", "centralized") if m in grid["method"]]
    ran = 0
    for values in itertools.product(*grid.values()):
        for key, value in zip(grid, values, strict=True):
            cfg[key] = value
        cfg.seed = 3
        planned = job_overrides(cfg)
        setting = cfg.settings[cfg.setting]
        if planned is None:
            assert cfg.method not in setting.methods
            continue
        partition, extra = planned
        selections = {
            "method": cfg.method,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "partition": partition,
        }
        experiment = compose_config(selections, f"{cfg.overrides} {extra} seed=3")
        ran += 1
        assert experiment.partition.seed == 3  # the seed fixes the partition too (paired design)
        assert experiment.dataset.tuning_examples == 500 and experiment.partition.num_clients == 10
        assert experiment.privacy.enabled == cfg.setting.startswith("dp")
        assert experiment.federation.clients_per_round(10) == 4  # two waves on two workers
        if cfg.setting.startswith("vision"):
            assert experiment.model.image_size == 96 and experiment.dataset.max_eval_examples == 1000
        if "tune" in preset:
            default = compose_config(selections, f"{cfg.overrides} seed=3").peak_lr
            assert experiment.dataset.evaluate_on == "tuning"
            assert experiment.peak_lr == pytest.approx(default * float(cfg.lr_mult), rel=1e-5)
            assert job_name(cfg) == f"{cfg.method}-{cfg.dataset}-{cfg.setting}-lr{float(cfg.lr_mult):g}-s3"
        else:
            assert experiment.dataset.evaluate_on == "validation" and experiment.peak_lr == 0.002
            assert job_name(cfg) == f"{cfg.method}-{cfg.dataset}-{cfg.setting}-s3"
    assert ran


def test_a_reported_job_without_tuned_values_stops_before_running(tmp_path):
    from launch.sweep import job_overrides

    cfg = _preset("cpu_paired")
    cfg.hydra = None
    cfg.tuned = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit, match="run the preset's tuning stage"):
        job_overrides(cfg)


def test_the_tuning_choice_is_the_best_grid_point_and_flags_the_grid_edge(tmp_path):
    from benchmarks.tuning import choose, tuning_curves, tuning_markdown
    from launch.sweep import tuned_overrides

    def record(method, lr, final, seed=0):
        return {
            "dataset": "sst2", "setting": "dir05", "method": method, "lr": lr, "seed": seed,
            "rounds": [{"metric": final}],
        }  # fmt: skip

    records = [
        record("fedit", 0.0016, 0.70), record("fedit", 0.005, 0.80), record("fedit", 0.016, 0.75),
        record("ffa_lora", 0.0016, 0.60), record("ffa_lora", 0.005, 0.70), record("ffa_lora", 0.016, 0.78),
        record("ffa_lora", 0.016, 0.76, seed=1),  # two seeds at one point: their mean
    ]  # fmt: skip
    curves = tuning_curves(records)
    assert curves["sst2/dir05"]["ffa_lora"][0.016] == pytest.approx(0.77)
    chosen = choose(curves, "accuracy")
    assert chosen["sst2/dir05"]["fedit"]["overrides"] == {"method.lr": 0.005}
    assert not chosen["sst2/dir05"]["fedit"]["at_grid_edge"]
    assert chosen["sst2/dir05"]["ffa_lora"]["overrides"] == {"method.lr": 0.016}
    assert chosen["sst2/dir05"]["ffa_lora"]["at_grid_edge"]  # the grid should have gone further
    text = tuning_markdown(chosen, "accuracy")
    assert "| `fedit` | 0.0016 → 70.0, **0.005 → 80.0**, 0.016 → 75.0 | 0.005 |" in text
    assert "| 0.016 † |" in text
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(chosen))
    assert tuned_overrides(path, "sst2/dir05", "ffa_lora") == "method.lr=0.016"


def test_a_wider_tuning_grid_widens_a_choice_only_at_the_edge_and_a_recorded_choice_stays(tmp_path):
    from benchmarks.tuning import write_tuned

    def record(method, mult, final, peak=0.005):
        return {
            "job": f"{method}-sst2-dir05-lr{mult:g}-s0", "dataset": "sst2", "setting": "dir05",
            "method": method, "lr": peak * mult, "seed": 0, "main_metric": "accuracy",
            "rounds": [{"metric": final}],
        }  # fmt: skip

    records = [record("fedit", m, f) for m, f in ((0.316, 0.7), (1, 0.8), (3.16, 0.75), (10, 0.9))]
    records += [record("full", m, f, 0.001) for m, f in ((0.316, 0.6), (1, 0.7), (3.16, 0.8))]
    records += [record("galore", m, f, 0.001) for m, f in ((0.316, 0.6), (1, 0.7), (3.16, 0.8), (10, 0.85))]
    assert write_tuned(records, tmp_path, complete=set()) == {}  # the cell's tuning is not complete
    assert "(pending: not all of the cell's tuning has run)" in (tmp_path / "tuning.md").read_text()
    chosen = write_tuned(records, tmp_path, complete={"sst2/dir05"})
    # fedit's × 10 point (C2's wider curve) scored best but is not a choice the others had
    assert chosen["sst2/dir05"]["fedit"]["overrides"] == {"method.lr": 0.005}
    assert chosen["sst2/dir05"]["full"]["overrides"] == {"method.lr": pytest.approx(0.00316)}
    assert chosen["sst2/dir05"]["full"]["at_grid_edge"]
    # galore's curve still rose at the common grid's edge: its × 10 point is a choice
    assert chosen["sst2/dir05"]["galore"]["overrides"] == {"method.lr": pytest.approx(0.01)}
    text = (tmp_path / "tuning.md").read_text()
    assert "0.05 → 90.0" in text and "**0.005 → 80.0**" in text and "pending" not in text
    better = [*records, record("fedit", 0.316, 0.95) | {"job": "fedit-sst2-dir05-lr0.316-s1", "seed": 1}]
    again = write_tuned(better, tmp_path)
    assert again["sst2/dir05"]["fedit"]["overrides"] == {"method.lr": 0.005}  # frozen once written
    assert "**0.005 → 80.0**" in (tmp_path / "tuning.md").read_text()  # the table shows what runs use
