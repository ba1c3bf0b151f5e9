"""ClientApp: load the global arrays (plus what the rule keeps locally), train or evaluate on
this node's data, reply with arrays and metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.node import node_data_path, node_hub_mirror, node_partition, node_rank
from client_app.session import ClientSession, get_session
from finetune.config import ExperimentConfig
from finetune.logs import setup_logging
from finetune.models import reinitialize_lora
from finetune.optim import build_optimizer
from finetune.privacy import PrivateRound, epsilon, plan_round
from finetune.records import from_record, to_record
from finetune.state import load_trainable_state, set_base_deltas, trainable_state
from finetune.training import local_step_count, train_local
from strategies import STRATEGIES, FederatedStrategy
from strategies.base import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.hetlora import hetlora_penalty_tail, self_pruning_penalty
from strategies.lowrank import is_lora_a
from strategies.merging import FROM_KEY, VERSION_KEY, catch_up, is_sync_key

log = logging.getLogger(__name__)
app = ClientApp()
LOCAL_KEY = "local-arrays"  # context.state record of what the rule keeps on the client
PRUNING_KEY = "rank-pruning"  # context.state record of HetLoRA's current rank and tail norm
OPTIMIZER_KEY = "optimizer-state"  # context.state record of the optimizer (train.keep_optimizer_state)
DP_KEY = "dp-history"  # context.state record of the DP-SGD rounds this node trained
BASE_KEY = "merged-base"  # context.state record of the base deltas (FLoRA, FedEx-LoRA) ...
BASE_VERSION_KEY = "merged-base-version"  # ... and the server round of the last merge in them


@dataclass
class Prepared:
    cfg: ExperimentConfig
    config: ConfigRecord
    session: ClientSession
    partition_id: int
    rule: type[FederatedStrategy]


def prepare(msg: Message, context: Context) -> Prepared:
    """Resolve the experiment and this node's partition, and load the model state to use."""
    setup_logging()
    config: ConfigRecord = msg.content.config_records[CONFIG_KEY]
    cfg = ExperimentConfig.from_json(str(config["experiment"]))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    partition_id = node_partition(context.node_config, cfg.partition.num_clients)
    rule = STRATEGIES[cfg.method.name]
    received = from_record(msg.content.array_records[ARRAYS_KEY])
    if rule.heterogeneous_ranks:
        # The payload's rank is this round's rank: the server decides (it may lag a pruning).
        sent_ranks = {v.shape[0] for k, v in received.items() if is_lora_a(k)}
        rank = sent_ranks.pop() if len(sent_ranks) == 1 else current_rank(context, cfg, partition_id)
        cfg = cfg.with_rank(rank)
    session = get_session(cfg, node_hub_mirror(context.node_config, cfg.hub_mirror))
    records = context.state.array_records
    kept = from_record(records[LOCAL_KEY]) if LOCAL_KEY in records else {}
    sync = {k: received.pop(k) for k in list(received) if is_sync_key(k)}
    # Every trainable array is overwritten: the model object serves many clients in turn.
    load_trainable_state(session.model, {**session.initial_state, **kept, **received})
    if rule.merges_into_base:
        set_base_deltas(session.model, session.base, update_merged_base(context, config, sync))
    if rule.merges_into_base and not rule.global_lora:  # FLoRA: a fresh adapter every round
        reinitialize_lora(session.model, seed=cfg.seed * 1_000_003 + int(config["server-round"]))
    return Prepared(cfg, config, session, partition_id, rule)


def update_merged_base(
    context: Context, config: ConfigRecord, sync: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """This node's base deltas brought to the server's version (kept in the node's context)."""
    record = context.state.config_records.get(BASE_VERSION_KEY)
    held_version = int(record["version"]) if record is not None else 0
    arrays = context.state.array_records
    held = from_record(arrays[BASE_KEY]) if BASE_KEY in arrays else {}
    target = int(config[VERSION_KEY])
    deltas = catch_up(held, held_version, sync, target, int(config[FROM_KEY]))
    context.state[BASE_KEY] = to_record(deltas)
    context.state[BASE_VERSION_KEY] = ConfigRecord({"version": target})
    return deltas


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    job = prepare(msg, context)
    own = node_data_path(context.node_config)
    data = job.session.local_data(own, job.partition_id) if own else job.session.partition(job.partition_id)
    server_round = int(job.config["server-round"])
    method = job.cfg.method
    privacy = plan_private_round(job, context, len(data))
    records = context.state.array_records
    keep_state = job.cfg.train.keep_optimizer_state
    result = train_local(
        job.session.model,
        data,
        job.session.task.collate,
        job.cfg.train,
        lr=float(job.config["lr"]),
        seed=job.cfg.seed * 1_000_003 + server_round * 1009 + job.partition_id,
        regularizer=(
            (lambda model: method.prune_lambda * self_pruning_penalty(model, method.prune_gamma))
            if job.rule.self_pruning
            else None
        ),
        optimizer=partial(build_optimizer, cfg=job.cfg, kind=job.rule.local_optimizer),
        optimizer_state=records[OPTIMIZER_KEY]["state"].numpy()
        if keep_state and OPTIMIZER_KEY in records
        else None,
        privacy=privacy,
    )
    if result.optimizer_state is not None:
        context.state[OPTIMIZER_KEY] = ArrayRecord({"state": Array(result.optimizer_state)})
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: len(data),
            "examples-seen": result.examples_seen,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "samples-per-second": result.samples_per_second,
            "peak-memory-mb": result.peak_memory_mb,
            "partition-id": job.partition_id,
            "optimizer-state-bytes": result.optimizer_state_bytes,
        }
    )
    if privacy is not None:
        metrics["dp-epsilon"] = record_private_round(context, privacy)
        metrics["dp-noise-multiplier"] = privacy.noise_multiplier
    if job.rule.merges_into_base:
        metrics[VERSION_KEY] = int(job.config[VERSION_KEY])
    if job.rule.heterogeneous_ranks:
        metrics["lora-rank"] = prune_rank(job, context) if job.rule.self_pruning else method.rank
    trained = trainable_state(job.session.model)
    local = {k: v for k, v in trained.items() if job.rule.client_keeps(k)}
    if local:
        context.state[LOCAL_KEY] = to_record(local)
    upload = {k: v for k, v in trained.items() if job.rule.client_uploads(k)}
    arrays = to_record(upload, job.cfg.method.wire_dtype)
    # the whole handler (model set-up, data preparation, training, serialization): the part of a
    # round's wall time that is neither Flower's transport nor its scheduling
    metrics["handler-seconds"] = time.perf_counter() - started
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation: this client's model on its own share of the validation split."""
    job = prepare(msg, context)
    data = job.session.eval_partition(job.partition_id)
    result = job.session.task.evaluate(job.session.model, data, job.cfg.train.eval_batch_size)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: len(data), **result})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Capabilities the server asks for before training: this node's LoRA rank and partition."""
    config: ConfigRecord = msg.content.config_records[CONFIG_KEY]
    cfg = ExperimentConfig.from_json(str(config["experiment"]))
    partition_id = node_partition(context.node_config, cfg.partition.num_clients)
    metrics = MetricRecord(
        {"lora-rank": current_rank(context, cfg, partition_id), "partition-id": partition_id}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def plan_private_round(job: Prepared, context: Context, num_examples: int) -> PrivateRound | None:
    """This round's DP-SGD parameters, or None without DP; refuses once the budget is spent."""
    dp = job.cfg.privacy
    if not dp.enabled:
        return None
    steps = local_step_count(job.cfg.train, num_examples)
    plan = plan_round(dp, num_examples, job.cfg.train.batch_size, steps, job.cfg.federation.num_rounds)
    if dp.target_epsilon > 0:
        after = epsilon(
            [*dp_history(context), (plan.noise_multiplier, plan.sample_rate, steps)],
            dp.target_delta,
            dp.accountant,
        )
        if after > dp.target_epsilon * (1 + 1e-3):
            raise RuntimeError(
                f"privacy budget exhausted: another round would spend ε={after:.3f} > "
                f"privacy.target_epsilon={dp.target_epsilon} (δ={dp.target_delta})"
            )
    return plan


def dp_history(context: Context) -> list[tuple[float, float, int]]:
    record = context.state.config_records.get(DP_KEY)
    if record is None:
        return []
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))


def record_private_round(context: Context, plan: PrivateRound) -> float:
    """Add this round to the node's DP history (in its context) and return ε spent so far."""
    history = [*dp_history(context), (plan.noise_multiplier, plan.sample_rate, plan.steps)]
    context.state[DP_KEY] = ConfigRecord(
        {"noise": [h[0] for h in history], "rate": [h[1] for h in history], "steps": [h[2] for h in history]}
    )
    return epsilon(history, plan.delta, plan.accountant)


def current_rank(context: Context, cfg: ExperimentConfig, partition_id: int) -> int:
    """The rank this node trains at now: a rank it pruned itself to, else its configured rank."""
    pruning = context.state.config_records.get(PRUNING_KEY)
    return int(pruning["rank"]) if pruning is not None else node_rank(context.node_config, cfg, partition_id)


def prune_rank(job: Prepared, context: Context) -> int:
    """HetLoRA: lower the rank to ceil(γ r) once the penalised tail shrank since last round."""
    rank, gamma = job.cfg.method.rank, job.cfg.method.prune_gamma
    with torch.no_grad():
        tail = float(self_pruning_penalty(job.session.model, gamma))
    previous = context.state.config_records.get(PRUNING_KEY)
    if previous is not None and tail < float(previous["tail-norm"]) and rank > 1:
        rank = hetlora_penalty_tail(rank, gamma)
    context.state[PRUNING_KEY] = ConfigRecord({"rank": rank, "tail-norm": tail})
    return rank
