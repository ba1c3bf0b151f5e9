"""The command line: plain overrides resolve to the same experiment as Flower's run config, and a bad
config fails before any Flower process starts."""

import pytest

import launch.cli as cli
from experiment_schema import ConfigError
from server_app.run_config import experiment_from_run_config


@pytest.fixture
def no_flower(monkeypatch):
    """Records any attempt to start Flower; a bad config must never get there."""
    started = []
    import launch.cluster
    import launch.simulation

    monkeypatch.setattr(launch.simulation.LocalSuperLink, "start", lambda self, *a, **k: started.append(self))
    monkeypatch.setattr(launch.cluster.LocalCluster, "start", lambda self: started.append(self))
    return started


def _legacy(run_config_line, tmp_path, hub_mirror):
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([f"{run_config_line} output-dir='{tmp_path}' hub-mirror='{hub_mirror}'"])
    return experiment_from_run_config(parsed)


@pytest.mark.parametrize(
    ("arguments", "run_config_line"),
    [
        (
            ["method=hlora", "method.client_ranks=[2,4,8,16]", "dataset=mrpc"],
            "method='hlora' dataset='mrpc' overrides='method.client_ranks=[2,4,8,16]'",
        ),
        (
            [
                "partition=iid",
                "partition.num_clients=4",
                "train.lr=1e-3",
                "name=my_run",
                "save_adapter=false",
            ],
            "partition='iid' "
            "overrides='partition.num_clients=4 train.lr=1e-3 name=my_run save_adapter=false'",
        ),
        (
            [
                "method=flexlora",
                "method.rank_by_memory_gb=[[0,4],[16,8]]",
                "model.lora_targets=[query,key,value]",
            ],
            "method='flexlora' "
            "overrides='method.rank_by_memory_gb=[[0,4],[16,8]] model.lora_targets=[query,key,value]'",
        ),
    ],
)
def test_plain_overrides_resolve_to_the_same_experiment_as_the_run_config(
    arguments, run_config_line, tmp_path, hub_mirror
):
    resolved = cli.resolve(arguments, [], str(tmp_path), str(hub_mirror))
    assert resolved.cfg == _legacy(run_config_line, tmp_path, hub_mirror)
    # and what it submits is what the ServerApp will read back from the TOML file
    from flwr.common.config import parse_config_args

    path = cli.write_run_config(resolved.run_config, tmp_path / "flwr")
    assert experiment_from_run_config(parse_config_args([str(path)])) == resolved.cfg


def test_the_legacy_run_config_flag_still_works(tmp_path, hub_mirror):
    legacy = ["method='ffa_lora' overrides='method.rank=4'"]
    resolved = cli.resolve(["train.lr=0.05"], legacy, str(tmp_path), str(hub_mirror))
    assert resolved.cfg.method.name == "ffa_lora" and resolved.cfg.method.rank == 4
    assert resolved.cfg.train.lr == 0.05


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["method=fedx"], "unknown method 'fedx'; valid choices"),
        (["method.rank=0"], r"method.rank must be >= 1, got 0"),
        (["train.lr=-1"], r"train.lr must be > 0"),
        (["train.lrr=0.1"], r"unknown key 'train.lrr'; train has"),
        (["--num-supernodes", "3", "partition.num_clients=2"], "starts 3 nodes but partition.num_clients=2"),
        (["dataset.repo_id=nobody/nothing"], "is not in the mirror"),
        (["logging.tracker=wandb"], "needs the wandb package"),
        (["lr=3"], "unknown key 'lr'"),
        (["noequals"], "is not an override"),
    ],
)
def test_a_bad_config_fails_before_any_process_starts(arguments, message, no_flower, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["run", *arguments]) == 2
    assert no_flower == []
    assert message.replace("\\", "") in capsys.readouterr().err or pytest.fail(capsys.readouterr().err)


def test_cluster_checks_the_federation_size_too(no_flower, capsys):
    assert cli.main(["cluster", "--num-nodes", "2"]) == 2  # the default experiment has 10 clients
    assert "partition.num_clients=10" in capsys.readouterr().err and no_flower == []


def test_validate_prints_the_resolved_experiment(capsys):
    assert cli.main(["validate", "method=fed_sb", "method.rank=16"]) == 0
    printed = capsys.readouterr().out
    assert "name: fed_sb" in printed and "alpha: 16.0" in printed  # alpha follows the rank


def test_help_lists_the_groups_and_their_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    for expected in ("method", "fedsvd", "partition", "dirichlet", "--num-supernodes", "train.*"):
        assert expected in text


def test_split_overrides_separates_group_selections():
    assert cli.split_overrides(["method=hlora", "method.rank=4", "seed=1"]) == (
        {"method": "hlora"},
        ["method.rank=4", "seed=1"],
    )
    with pytest.raises(ConfigError):
        cli.split_overrides(["hlora"])


@pytest.mark.parametrize(
    ("flag", "user_setting", "joins"),
    [
        ([], None, "local"),  # its own Ray, never a cluster some earlier `ray start` left recorded
        ([], "head:6379", "head:6379"),  # the user's own RAY_ADDRESS stands
        (["--ray-address", "10.1.2.3:6379"], None, "10.1.2.3:6379"),
        (["--ray-address", "10.1.2.3:6379"], "head:6379", "10.1.2.3:6379"),  # the flag wins
    ],
    ids=["no-address", "user-address", "flag", "flag-over-user-address"],
)
def test_a_simulation_can_join_a_running_ray_cluster_and_otherwise_starts_its_own(
    flag, user_setting, joins, tmp_path, monkeypatch, hub_mirror
):
    """The backend is Ray's: flwr-simulation's ``ray.init()`` joins the cluster RAY_ADDRESS names.
    What ``fedsubspace run`` hands the SuperLink process it starts (stopped right there)."""
    import signal

    import launch.simulation

    class Started(Exception):
        pass

    started = []

    def start_process(command, env, cwd):
        started.append((command, env))
        raise Started

    monkeypatch.setattr(launch.simulation, "start_process", start_process)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # launch() would keep its SIGTERM handler
    if user_setting is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", user_setting)
    folders = ["--flwr-home", str(tmp_path / "flwr"), "--output-dir", str(tmp_path)]
    with pytest.raises(Started):
        cli.main(["run", *flag, *folders, "--hub-mirror", str(hub_mirror), "model=tiny_bert"])
    [(command, env)] = started
    assert "--simulation" in command
    assert env["RAY_ADDRESS"] == joins


def _checkpointed_run(folder, round_=2):
    """A run folder as a crashed run leaves it: config.yaml and a checkpoint after ``round_``."""
    import numpy as np

    from experiment_schema import compose_config
    from server_app.checkpoint import Checkpoint, write_checkpoint

    cfg = compose_config({"model": "tiny_bert"}, ["federation.num_rounds=4"])
    folder.mkdir()
    (folder / "config.yaml").write_text(cfg.to_yaml())
    write_checkpoint(folder, Checkpoint(round_, {"w": np.zeros(2, np.float32)}, cfg.to_dict(), "h"), keep=2)
    return folder


def test_resume_refuses_another_experiment_before_any_process_starts(tmp_path, no_flower, capsys):
    folder = _checkpointed_run(tmp_path / "run")
    assert cli.main(["resume", str(folder), "method.rank=16"]) == 2
    assert "method.rank: 8 -> 16" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="would change the experiment"):
        cli.main(["resume", str(folder), "method=flora"])
    assert cli.main(["validate", "--resume", str(folder), "model=tiny_bert", "federation.num_rounds=4"]) == 0
    assert cli.main(["validate", "--resume", str(folder), "model=tiny_bert", "federation.num_rounds=2"]) == 2
    assert "federation.num_rounds=<more>" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text((folder / "config.yaml").read_text())
    assert cli.main(["resume", str(tmp_path / "empty")]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert no_flower == []


def test_resume_submits_the_folder_and_the_allowed_changes(tmp_path, monkeypatch):
    folder = _checkpointed_run(tmp_path / "run")
    submitted = {}
    monkeypatch.setattr(
        cli, "launch", lambda args, experiment, nodes: submitted.update(vars(args), exp=experiment) or 0
    )
    assert cli.main(["resume", str(folder), "federation.num_rounds=6", "--timeout", "60"]) == 0
    experiment = submitted["exp"]
    assert experiment.run_config["resume-from"] == str(folder.resolve())
    assert experiment.cfg.federation.num_rounds == 6 and experiment.cfg.output_dir == str(tmp_path.resolve())
    assert submitted["command"] == "run" and submitted["timeout"] == 60
