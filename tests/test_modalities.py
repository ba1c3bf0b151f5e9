"""Every rule on every modality: the real ServerApp experiment and the real ClientApp functions,
in one process through a stand-in Grid (the `flwr run` versions are in test_e2e_simulation.py)."""

import json

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from fakes import FakeGrid
from flwr.app import Context, MessageType, RecordDict

from client_app.app import evaluate, query, setup, train
from experiment_schema import compose_config
from server_app.app import run_experiment
from server_app.results import RunRecorder
from strategies import RULES
from strategies.protocol import SETUP_MESSAGE

MODALITIES = {
    "image": ({"model": "tiny_vit", "dataset": "cifar10", "partition": "feature_shift"}, []),
    "causal_lm": (
        {"model": "tiny_llama", "dataset": "gsm8k", "partition": "clusters"},
        [
            "partition.clusters=4",
            "dataset.generate_examples=2",
            "dataset.max_new_tokens=4",
            "dataset.max_eval_examples=16",
            "partition.min_partition_size=2",
        ],
    ),
}
HANDLERS = {
    MessageType.TRAIN: train,
    MessageType.EVALUATE: evaluate,
    MessageType.QUERY: query,
    SETUP_MESSAGE: setup,
}


def run_in_process(cfg, tmp_path):
    """Two clients (partitions 0 and 1) answering the server's messages with the ClientApp."""
    contexts = {
        100 + p: Context(
            run_id=1,
            node_id=100 + p,
            node_config={"partition-id": p, "num-partitions": 2},
            state=RecordDict(),
            run_config={},
        )
        for p in range(2)
    }

    def respond(message):
        handler = HANDLERS[message.metadata.message_type]
        return handler(message, contexts[message.metadata.dst_node_id]).content

    cfg.output_dir = str(tmp_path)
    recorder = RunRecorder.create(cfg)
    run_experiment(FakeGrid(list(contexts), respond), cfg, recorder)
    return recorder


@pytest.mark.parametrize("modality", sorted(MODALITIES))
@pytest.mark.parametrize("method", sorted(RULES))
def test_every_rule_runs_on_every_modality(modality, method, hub_mirror, tmp_path):
    selections, extra = MODALITIES[modality]
    cfg = compose_config(
        {**selections, "method": method}, [*TINY_OVERRIDES, "partition.num_clients=2", *extra]
    )
    cfg.hub_mirror = str(hub_mirror)
    recorder = run_in_process(cfg, tmp_path)
    rows = recorder.rows
    assert [row["round"] for row in rows] == [0, 1, 2]
    main = f"eval_{cfg.dataset.main_metric}"
    assert all(np.isfinite(row["eval_loss"]) and 0 <= row[main] <= 1 for row in rows)
    if not RULES[method].centralized:
        assert all(row["clients_aggregated"] == 2 and row["clients_rejected"] == {} for row in rows[1:])
    summary = json.loads((recorder.folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    if not RULES[method].personalised:
        saved = summary["adapter_dir"] or summary["model_dir"]
        assert saved and any((recorder.folder / saved).iterdir())
