"""Both halves of every registered rule agree on what travels: the engine sends the rule's
payload, the real client function trains on it and uploads, and the engine accepts every reply
(no rejection) for two rounds — round 2 brings RoLoRA's other factor, the merged-base rules'
catch-up and Fed-SB's payload without its fixed factors."""

import pytest
from fakes import FakeGrid, real_clients

from experiment_schema import compose_config
from finetune.models import build_model
from finetune.records import to_record
from finetune.state import trainable_state
from server_app.loop import exchange
from strategies import RULES, get_rule
from strategies.protocol import Instruction

FEDERATED = sorted(name for name, rule in RULES.items() if not rule.centralized)


@pytest.mark.parametrize("name", FEDERATED)
def test_every_upload_is_what_the_server_expects(name, hub_mirror):
    from conftest import TINY_OVERRIDES

    cfg = compose_config(
        {"model": "tiny_bert", "method": name}, [*TINY_OVERRIDES, "train.local_steps=1", "train.batch_size=4"]
    )
    cfg.hub_mirror = str(hub_mirror)
    rule = get_rule(name)
    server_model = build_model(cfg, hub_mirror, rule.server_adapter(cfg))
    strategy = rule.build_strategy(cfg)
    nodes = {101: 0, 102: 1}
    grid = FakeGrid(nodes, real_clients(nodes))
    arrays = to_record(strategy.initial_state(trainable_state(server_model)))
    arrays = strategy.setup(grid, arrays, Instruction(cfg.to_json()).to_config())
    for server_round in (1, 2):
        config = Instruction(cfg.to_json(), server_round=server_round, lr=1e-3).to_config()
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        new_arrays, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=5.0))
        stats = strategy.rounds[server_round]
        assert stats.rejected == {}, f"{name}, round {server_round}: {stats.rejected}"
        assert sorted(stats.aggregated) == sorted(nodes)
        assert new_arrays is not None
        arrays = new_arrays
