"""A communication budget (federation.max_communication_mb, FlowerTune's): the round that would
take the run past it is not sent, and the run stops, says why, and keeps what it trained."""

import json

import pytest


def test_a_run_stops_before_the_round_that_would_exceed_its_budget(hub_mirror, tmp_path):
    from conftest import TINY_OVERRIDES
    from fakes import FakeGrid, real_clients

    from experiment_schema import compose_config
    from server_app.app import build_server_model, run_experiment
    from server_app.results import RunRecorder
    from strategies import get_rule

    cfg = compose_config(
        {"model": "tiny_bert", "method": "fedit"},
        [*TINY_OVERRIDES, "federation.num_rounds=3", "train.local_steps=1", "save_adapter=false"],
    )
    cfg.hub_mirror, cfg.output_dir = str(hub_mirror), str(tmp_path)
    state = (
        get_rule("fedit")
        .build_strategy(cfg)
        .initial_state(build_server_model(cfg, get_rule("fedit")).initial)
    )
    per_round = 2 * 2 * sum(a.nbytes for a in state.values())  # FedIT: every array, down and up, 2 clients
    cfg.federation.max_communication_mb = 1.5 * per_round / 1e6
    recorder = RunRecorder.create(cfg)
    nodes = {100: 0, 101: 1}
    run_experiment(FakeGrid(nodes, real_clients(nodes)), cfg, recorder)
    assert [row["round"] for row in recorder.rows] == [0, 1]
    moved = sum(row["payload_bytes_down"] + row["payload_bytes_up"] for row in recorder.rows)
    assert moved == per_round <= cfg.federation.max_communication_mb * 1e6
    summary = json.loads((recorder.folder / "summary.json").read_text())
    assert "round 2 would move" in summary["stopped"] and "stops after round 1" in summary["stopped"]
    assert (
        summary["final_round"] == 1 and summary["final"]["eval_accuracy"] == recorder.rows[1]["eval_accuracy"]
    )


def test_a_negative_budget_is_refused():
    from experiment_schema import ConfigError, compose_config

    with pytest.raises(ConfigError, match="max_communication_mb"):
        compose_config({}, ["federation.max_communication_mb=-1"])
