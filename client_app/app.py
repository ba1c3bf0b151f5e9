"""ClientApp: load the global trainable arrays, train locally, reply with arrays and metrics."""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.node import node_hub_mirror, node_partition
from client_app.session import get_session
from finetune.config import ExperimentConfig
from finetune.logs import setup_logging
from finetune.records import from_record, to_record
from finetune.state import load_trainable_state, trainable_state
from finetune.training import train_local
from strategies import STRATEGIES
from strategies.base import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY

log = logging.getLogger(__name__)
app = ClientApp()
LOCAL_KEY = "local-arrays"  # context.state record of what the rule keeps on the client


@app.train()
def train(msg: Message, context: Context) -> Message:
    setup_logging()
    config: ConfigRecord = msg.content.config_records[CONFIG_KEY]
    cfg = ExperimentConfig.from_json(str(config["experiment"]))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    partition_id = node_partition(context.node_config, cfg.partition.num_clients)
    session = get_session(cfg, node_hub_mirror(context.node_config, cfg.hub_mirror))
    data = session.partition(partition_id)

    rule = STRATEGIES[cfg.method.name]
    # Every trainable array is overwritten: the model object serves many clients in turn.
    kept = (
        from_record(context.state.array_records[LOCAL_KEY])
        if LOCAL_KEY in context.state.array_records
        else {}
    )
    received = from_record(msg.content.array_records[ARRAYS_KEY])
    load_trainable_state(session.model, {**session.initial_state, **kept, **received})
    server_round = int(config["server-round"])
    result = train_local(
        session.model,
        data,
        session.tokenizer,
        cfg.train,
        lr=float(config["lr"]),
        seed=cfg.seed * 1_000_003 + server_round * 1009 + partition_id,
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: len(data),
            "examples-seen": result.examples_seen,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "samples-per-second": result.samples_per_second,
            "peak-memory-mb": result.peak_memory_mb,
            "partition-id": partition_id,
        }
    )
    trained = trainable_state(session.model)
    upload = {k: v for k, v in trained.items() if rule.client_uploads(k)}
    local = {k: v for k, v in trained.items() if rule.client_keeps(k)}
    if local:
        context.state[LOCAL_KEY] = to_record(local)
    arrays = to_record(upload, cfg.method.wire_dtype)
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)
