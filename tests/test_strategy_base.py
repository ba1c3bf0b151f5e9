"""Message plumbing of every strategy: per-node messages, bytes, rejection of bad replies, quorum."""

import numpy as np
import pytest
from fakes import FakeGrid, engine
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from experiment_schema import MethodConfig
from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire
from server_app.loop import exchange
from strategies.fedit import FedIT
from strategies.replies import aggregate_metrics

GLOBAL = {"lora_A": np.ones((2, 3), np.float32), "lora_B": np.zeros((4, 2), np.float32)}


def reply(arrays: dict, num_examples=10, **metrics) -> RecordDict:
    return RecordDict(
        {
            "arrays": to_wire(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, **metrics}),
        }
    )


def scaled(factor: float) -> dict:
    return {k: v + factor for k, v in GLOBAL.items()}


def run_round(strategy, grid, server_round=1):
    messages = list(
        strategy.configure_train(server_round, to_record(GLOBAL), ConfigRecord({"lr": 0.1}), grid)
    )
    replies = exchange(grid, messages, timeout=1.0)
    return strategy.aggregate_train(server_round, replies)


def test_one_message_per_sampled_node_with_its_own_config():
    grid = FakeGrid([11, 22, 33, 44], lambda m: reply(scaled(1.0)))
    strategy = engine(FedIT, fraction_train=0.5, min_train_nodes=2, seed=3)
    messages = list(strategy.configure_train(4, to_record(GLOBAL), ConfigRecord({"lr": 0.1}), grid))
    assert len(messages) == 2
    assert len({m.metadata.dst_node_id for m in messages}) == 2
    configs = [m.content.config_records["config"] for m in messages]
    assert configs[0] is not configs[1]
    assert all(c["server-round"] == 4 and c["lr"] == 0.1 for c in configs)
    stats = strategy.rounds[4]
    sent = {m.metadata.dst_node_id: m.content.array_records["arrays"].count_bytes() for m in messages}
    assert stats.bytes_down == sent  # the packed record each node is sent


def test_sampling_keeps_64_bit_node_ids_exact():
    # Flower node ids are unsigned 64-bit integers; floats or int64 would corrupt them.
    ids = [17934763832037251072, 4884012393179950080, 2**64 - 1, 12587801198025101313]
    grid = FakeGrid(ids, lambda m: None)
    for server_round in range(1, 5):
        sampled = engine(FedIT, fraction_train=0.5, min_train_nodes=1).nodes.sample(
            grid.get_node_ids(), server_round
        )
        assert set(sampled) <= set(ids) and len(sampled) == 2


def test_sampling_is_seeded_per_round():
    grid = FakeGrid(range(1, 11), lambda m: None)
    a = engine(FedIT, fraction_train=0.3, min_train_nodes=1, seed=0)
    b = engine(FedIT, fraction_train=0.3, min_train_nodes=1, seed=0)
    assert a.nodes.sample(grid.get_node_ids(), 1) == b.nodes.sample(grid.get_node_ids(), 1)
    rounds = {tuple(a.nodes.sample(grid.get_node_ids(), r)) for r in range(1, 6)}
    assert len(rounds) > 1 and all(len(s) == 3 for s in rounds)


def described_grid(partition_of: dict[int, int], upload_of_partition=None) -> FakeGrid:
    """Nodes (node id → partition id) that tell their partition when queried and train on it."""

    def respond(message: Message) -> RecordDict:
        partition = partition_of[message.metadata.dst_node_id]
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"partition-id": partition})})
        return reply(upload_of_partition(partition) if upload_of_partition else scaled(partition))

    return FakeGrid(partition_of, respond)


def test_a_seed_samples_the_same_partitions_whatever_the_node_ids():
    # Node ids are drawn anew each time a federation starts; the seed must still pick the
    # same data owners, or two runs of one experiment train different clients.
    grids = [described_grid({100 + p: p for p in range(10)}), described_grid({900 - p: p for p in range(10)})]
    sampled: list[list[list[int]]] = []
    for grid in grids:
        strategy = engine(FedIT, fraction_train=0.3, min_train_nodes=1, seed=7)
        rounds = []
        for server_round in range(1, 6):
            messages = strategy.configure_train(server_round, to_record(GLOBAL), ConfigRecord({}), grid)
            rounds.append(sorted(strategy.node_partitions[m.metadata.dst_node_id] for m in messages))
        sampled.append(rounds)
    assert sampled[0] == sampled[1]
    assert len({tuple(r) for r in sampled[0]}) > 1  # and the sample changes from round to round


def test_aggregation_sums_in_partition_order_whatever_the_node_ids():
    # float sums depend on their order: (1e17 + 1) - 1e17 = 0 but (1e17 - 1e17) + 1 = 1
    value = {0: 1e17, 1: 1.0, 2: -1e17}

    def upload(partition: int) -> dict:
        return {k: np.full_like(v, value[partition]) for k, v in GLOBAL.items()}

    results = []
    for partition_of in ({5: 0, 6: 1, 7: 2}, {7: 0, 5: 1, 6: 2}, {6: 0, 7: 1, 5: 2}):
        arrays, _ = run_round(engine(FedIT, min_train_nodes=3), described_grid(partition_of, upload))
        results.append(from_record(arrays))
    for other in results[1:]:
        assert all(np.array_equal(results[0][k], other[k]) for k in GLOBAL)


def test_reply_metrics_keep_their_own_weights_whatever_the_arrival_order():
    sizes, losses = {0: 10, 1: 30}, {0: 1.0, 1: 3.0}
    grid = FakeGrid(
        [1, 2],
        lambda m: (
            RecordDict({"metrics": MetricRecord({"partition-id": m.metadata.dst_node_id - 1})})
            if m.metadata.message_type == "query"
            else reply(
                scaled(0.0),
                sizes[m.metadata.dst_node_id - 1],
                **{"train-loss": losses[m.metadata.dst_node_id - 1]},
            )
        ),
    )
    strategy = engine(FedIT, min_train_nodes=2)
    messages = list(strategy.configure_train(1, to_record(GLOBAL), ConfigRecord({}), grid))
    replies = list(reversed(exchange(grid, messages, timeout=1.0)))  # the larger client answers first
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)


def test_two_nodes_claiming_one_partition_are_reported(caplog):
    run_round(engine(FedIT, min_train_nodes=3), described_grid({1: 0, 2: 1, 3: 0}))
    assert "nodes [1, 3] all hold partition 0" in caplog.text


def test_weighted_fedit_round_and_bytes_up():
    sizes = {1: 10, 2: 30}
    grid = FakeGrid(
        [1, 2], lambda m: reply(scaled(float(m.metadata.dst_node_id)), sizes[m.metadata.dst_node_id])
    )
    strategy = engine(FedIT, fraction_train=1.0, min_train_nodes=2)
    arrays, metrics = run_round(strategy, grid)
    # p = (0.25, 0.75): 0.25 * (x + 1) + 0.75 * (x + 2) = x + 1.75
    for key, value in from_record(arrays).items():
        np.testing.assert_allclose(value, GLOBAL[key] + 1.75)
    assert metrics["num-examples"] == 40
    assert strategy.rounds[1].bytes_up == {1: to_wire(GLOBAL).count_bytes(), 2: to_wire(GLOBAL).count_bytes()}
    assert sorted(strategy.rounds[1].aggregated) == [1, 2]


@pytest.mark.parametrize(
    ("bad_reply", "reason"),
    [
        (lambda: reply({**scaled(9), "lora_A": np.full((2, 3), np.nan, np.float32)}), "NaN or Inf"),
        (lambda: reply({**scaled(9), "lora_B": np.full((4, 2), np.inf, np.float32)}), "NaN or Inf"),
        (lambda: reply({"lora_A": GLOBAL["lora_A"]}), "missing arrays"),
        (lambda: reply({**scaled(9), "extra": np.zeros(1, np.float32)}), "unexpected arrays"),
        (lambda: reply({**scaled(9), "lora_B": np.zeros((4, 3), np.float32)}), "shape"),
        (lambda: reply(scaled(9), num_examples=0), "num-examples"),
        (lambda: reply(scaled(9), num_examples=-5), "num-examples"),
        (lambda: RecordDict({"metrics": MetricRecord({"num-examples": 3})}), "lacks"),
        (lambda: Error(code=0, reason="boom"), "client error: boom"),
    ],
)
def test_bad_reply_is_rejected_logged_and_left_out(bad_reply, reason, caplog):
    grid = FakeGrid([1, 2], lambda m: reply(scaled(1.0)) if m.metadata.dst_node_id == 1 else bad_reply())
    strategy = engine(FedIT, fraction_train=1.0, min_train_nodes=2)
    with caplog.at_level("WARNING"):
        arrays, _ = run_round(strategy, grid)
    for key, value in from_record(arrays).items():  # only node 1 counted
        np.testing.assert_allclose(value, GLOBAL[key] + 1.0)
    assert reason in strategy.rounds[1].rejected[2]
    assert "node 2 rejected" in caplog.text and reason in caplog.text


def test_missing_reply_is_recorded():
    grid = FakeGrid([1, 2], lambda m: reply(scaled(1.0)) if m.metadata.dst_node_id == 1 else None)
    strategy = engine(FedIT, fraction_train=1.0, min_train_nodes=2)
    arrays, _ = run_round(strategy, grid)
    assert arrays is not None
    assert "no reply" in strategy.rounds[1].rejected[2]


def test_below_quorum_keeps_previous_state():
    grid = FakeGrid([1, 2, 3], lambda m: reply(scaled(1.0)) if m.metadata.dst_node_id == 1 else Error(0, "x"))
    strategy = engine(FedIT, fraction_train=1.0, min_train_nodes=3, min_replies=2)
    arrays, metrics = run_round(strategy, grid)
    assert arrays is None and metrics is None
    assert strategy.rounds[1].kept_previous


def test_error_reply_from_superlink_is_attributed_to_the_dead_node():
    grid = FakeGrid([5, 6], lambda m: reply(scaled(1.0)))
    strategy = engine(FedIT, fraction_train=1.0, min_train_nodes=2)
    messages = list(strategy.configure_train(1, to_record(GLOBAL), ConfigRecord(), grid))
    grid.push_messages(messages)
    good = grid.pull_messages(["msg-0"])
    # A "node unavailable" reply comes from the SuperLink (node 1), not from node 6.
    dead = Message(Error(code=0, reason="Node Unavailable"), reply_to=messages[1])
    dead.metadata.__dict__["_src_node_id"] = 1
    strategy.aggregate_train(1, [*good, dead])
    assert "Node Unavailable" in strategy.rounds[1].rejected[6]


def test_metrics_aggregation_sums_counts_and_takes_maxima():
    metrics = [
        {"num-examples": 10, "train-loss": 1.0, "train-seconds": 3.0, "peak-memory-mb": 100.0},
        {"num-examples": 30, "train-loss": 2.0, "train-seconds": 5.0, "peak-memory-mb": 50.0},
    ]
    out = aggregate_metrics(metrics, [10, 30])
    assert out["num-examples"] == 40
    assert out["train-loss"] == pytest.approx(1.75)
    assert out["train-seconds"] == 5.0 and out["peak-memory-mb"] == 100.0


def test_wire_dtype_float16_halves_bytes_down():
    grid = FakeGrid([1, 2], lambda m: None)
    fp32 = engine(FedIT, MethodConfig(wire_dtype="float32"), fraction_train=1.0)
    fp16 = engine(FedIT, MethodConfig(wire_dtype="float16"), fraction_train=1.0)
    fp32.configure_train(1, to_record(GLOBAL), ConfigRecord(), grid)
    fp16.configure_train(1, to_record(GLOBAL), ConfigRecord(), grid)
    payload = sum(v.size for v in GLOBAL.values())
    assert (
        sum(fp32.rounds[1].bytes_down.values()) - sum(fp16.rounds[1].bytes_down.values()) == 2 * 2 * payload
    )


def test_records_round_trip():
    record = to_record(GLOBAL)
    assert isinstance(record, ArrayRecord)
    back = from_record(record)
    for key in GLOBAL:
        np.testing.assert_array_equal(back[key], GLOBAL[key])


def test_raw_payload_bytes_and_client_seconds_are_recorded():
    seconds = {1: 2.5, 2: 4.0}

    def timed_reply(message):
        node = message.metadata.dst_node_id
        return reply(scaled(1.0), **{"train-seconds": seconds[node], "handler-seconds": seconds[node] + 1})

    grid = FakeGrid([1, 2], timed_reply)
    strategy = engine(FedIT, fraction_train=1.0, min_train_nodes=2)
    run_round(strategy, grid)
    stats = strategy.rounds[1]
    raw = (2 * 3 + 4 * 2) * 4  # the float32 elements alone
    assert stats.payload_down == {1: raw, 2: raw} and stats.payload_up == {1: raw, 2: raw}
    assert all(stats.bytes_down[n] > raw for n in (1, 2))  # numpy headers and keys on top
    assert stats.client_seconds == seconds
    assert stats.handler_seconds == {1: 3.5, 2: 5.0}


def test_a_configuration_error_every_node_reports_ends_the_run():
    from flwr.app import Error

    reason = "<class 'experiment_schema.ConfigError'>:<'the federation has 3 partitions, the experiment 2'>"
    grid = FakeGrid([1, 2, 3], lambda m: Error(code=0, reason=reason))
    with pytest.raises(RuntimeError, match=r"every node \(3\) refused to describe itself.*3 partitions"):
        engine(FedIT, min_train_nodes=3).configure_train(
            1, to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), grid
        )


def test_one_misconfigured_node_among_good_ones_is_left_out_and_named():
    from flwr.app import Error

    reason = "<class 'experiment_schema.ConfigError'>:<'node config has no partition-id'>"

    def respond(message):
        node = message.metadata.dst_node_id
        if node == 3:
            return Error(code=0, reason=reason)
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"partition-id": node})})
        upload = from_wire(message.content.array_records["arrays"])
        return RecordDict({"arrays": to_wire(upload), "metrics": MetricRecord({"num-examples": 5})})

    strategy = engine(FedIT, min_train_nodes=3)
    grid = FakeGrid([1, 2, 3], respond)
    messages = list(
        strategy.configure_train(1, to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), grid)
    )
    arrays, _ = strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))
    assert arrays is not None and strategy.rounds[1].aggregated == [1, 2]
    assert "no partition-id" in strategy.rounds[1].rejected[3]


def test_a_round_where_every_node_refuses_its_config_ends_the_run():
    from flwr.app import Error

    reason = "<class 'finetune.data.DataNotFoundError'>:<'split train of x/y is not in the mirror'>"

    def respond(message):
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"partition-id": message.metadata.dst_node_id})})
        return Error(code=0, reason=reason)

    strategy = engine(FedIT, min_train_nodes=2)
    grid = FakeGrid([1, 2], respond)
    messages = list(
        strategy.configure_train(1, to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), grid)
    )
    with pytest.raises(RuntimeError, match=r"refused to train in round 1.*not in the mirror"):
        strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))


def test_a_large_federation_asks_only_the_nodes_it_samples():
    # Prepare: 150 nodes registered in partition order, random node ids; 10 % sampled
    rng = np.random.default_rng(5)
    node_ids = [int(x) for x in rng.choice(2**40, size=150, replace=False)]
    partition_of = {n: i for i, n in enumerate(node_ids)}
    asked = []

    def respond(message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type == "query":
            asked.append(node)
            return RecordDict({"metrics": MetricRecord({"partition-id": partition_of[node]})})
        return None

    def sampled_partitions(query_all_up_to):
        asked.clear()
        strategy = engine(
            FedIT, fraction_train=0.1, min_train_nodes=1, seed=3, query_all_up_to=query_all_up_to
        )
        strategy.configure_train(
            1, to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), FakeGrid(node_ids, respond)
        )
        return sorted(partition_of[n] for n in strategy.rounds[1].sampled), len(asked)

    # Execute
    lazy, lazily_asked = sampled_partitions(100)
    whole, all_asked = sampled_partitions(1000)
    # Assert: the same partitions either way (registration order is partition order), 15 nodes asked not 150
    assert lazy == whole and len(lazy) == 15
    assert lazily_asked == 15 and all_asked == 150


def _streamed_round(uploads, sizes, arrival, stream="on", fail=()):
    """One FedIT round whose replies the loop hands over one by one, in ``arrival`` order."""
    from flwr.app import Error

    def respond(message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"partition-id": node})})
        if node in fail:
            return Error(code=0, reason="boom")
        return RecordDict(
            {"arrays": to_wire(uploads[node]), "metrics": MetricRecord({"num-examples": sizes[node]})}
        )

    strategy = engine(FedIT, min_train_nodes=len(sizes))
    grid = FakeGrid(list(sizes), respond)
    messages = list(
        strategy.configure_train(1, to_record({"w": np.zeros(3, np.float32)}), ConfigRecord(), grid)
    )
    replies = {m.metadata.src_node_id: m for m in exchange(grid, messages, timeout=1.0)}
    assert strategy.start_streaming(1, stream) == (stream == "on")
    for node in arrival:
        if node in replies and stream == "on":
            strategy.receive(replies[node])
    leftover = [] if stream == "on" else [replies[n] for n in arrival if n in replies]
    arrays, _ = strategy.aggregate_train(1, leftover)
    return strategy, from_record(arrays)["w"]


def test_streamed_sums_do_not_depend_on_arrival_order_and_hold_few_replies():
    rng = np.random.default_rng(11)
    sizes = {n: int(rng.integers(1, 100)) for n in range(1, 7)}
    uploads = {n: {"w": (rng.normal(size=3) * 10.0 ** rng.integers(-8, 8)).astype(np.float32)} for n in sizes}
    in_order, reversed_order = list(sizes), list(reversed(sizes))
    a, first = _streamed_round(uploads, sizes, in_order)
    b, second = _streamed_round(uploads, sizes, reversed_order)
    _, held = _streamed_round(uploads, sizes, in_order, stream="off")
    np.testing.assert_array_equal(first, second)  # bit for bit, whatever the arrival order
    np.testing.assert_allclose(first, held, rtol=1e-6)  # and the mean the held replies give
    assert a.rounds[1].peak_held_replies == 1 and b.rounds[1].peak_held_replies == 6  # worst case: all wait
    assert a.rounds[1].aggregated == in_order


def test_a_streamed_round_skips_rejected_and_silent_nodes():
    sizes = {1: 10, 2: 20, 3: 30, 4: 40}
    uploads = {n: {"w": np.full(3, float(n), np.float32)} for n in sizes}
    # 2 answers with an error, 4 never answers
    strategy, mean = _streamed_round(uploads, sizes, [3, 2, 1], fail={2})
    np.testing.assert_allclose(mean, (1 * 10 + 3 * 30) / 40)
    stats = strategy.rounds[1]
    assert stats.aggregated == [1, 3] and "boom" in stats.rejected[2] and "no reply" in stats.rejected[4]
