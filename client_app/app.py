"""ClientApp: open the round (experiment, this node's partition, the rule's client half and the
model), train or evaluate on this node's data, reply with arrays and metrics.

Nothing here depends on the rule: the rule's client half (``strategies/<rule>.py``, through
:class:`~strategies.client.ClientRule`) says what the model trains, what it starts from, what goes
up and what stays on the node.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import datasets
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.durable import DurableState, node_state_dir, restore_once
from client_app.node import node_data_path, node_facts, node_hub_mirror, node_partition
from client_app.privacy import PrivacyLedger, ledger_key, plan_private_round
from client_app.session import ClientSession, get_session
from experiment_schema import ExperimentConfig
from finetune.optim import build_optimizer
from finetune.privacy import PrivateRound
from finetune.records import from_record, to_record
from finetune.state import trainable_state
from finetune.training import TrainResult, train_local
from finetune.wire import pack, unpack
from strategies import get_rule
from strategies.client import OPTIMIZER_STATE, ClientRound, ClientRule, NodeState
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    Instruction,
    NodeDescription,
    TrainReport,
)

log = logging.getLogger(__name__)
app = ClientApp()


@dataclass
class Job:
    """One message's work: the experiment, this node, the rule's client half and the model."""

    round: ClientRound
    rule: ClientRule
    session: ClientSession
    context: Context

    @property
    def cfg(self) -> ExperimentConfig:
        return self.round.cfg

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    def training_data(self) -> datasets.Dataset:
        own = node_data_path(self.context.node_config)
        if own:
            return self.session.local_data(own, self.round.partition_id)
        return self.session.partition(self.round.partition_id)

    def durable(self) -> DurableState | None:
        return durable_state(self.round, self.context)

    def ledger(self) -> PrivacyLedger:
        root = node_state_dir(self.context.node_config, self.cfg)
        key = ledger_key(self.cfg, self.round.partition_id, node_data_path(self.context.node_config))
        return PrivacyLedger(root, key)

    def seed(self) -> int:
        return training_seed(self.cfg, self.round.instruction.server_round, self.round.partition_id)


def training_seed(cfg: ExperimentConfig, server_round: int, partition_id: int) -> int:
    """Dropout and batch order: the same whichever process trains this client this round, and the
    same for every method (a benchmark seed pairs the methods' runs)."""
    return cfg.seed * 1_000_003 + server_round * 1009 + partition_id


def read_round(msg: Message, context: Context) -> ClientRound:
    """The message's instruction and experiment, and this node's partition and state (on a
    resumed run's first message, restored from what the node kept on disk)."""
    instruction = Instruction.from_config(msg.content.config_records[CONFIG])
    cfg = ExperimentConfig.from_json(instruction.experiment)
    partition_id = node_partition(context.node_config, cfg.partition.num_clients)
    job_round = ClientRound(cfg, instruction, partition_id, NodeState(context.state))
    durable = durable_state(job_round, context)
    if durable is not None:
        restore_once(context.state, durable, instruction.server_round)
    return job_round


def durable_state(job_round: ClientRound, context: Context) -> DurableState | None:
    """This node's on-disk copy of its rule state for the experiment (None outside a recorded run)."""
    if not job_round.cfg.experiment_id:
        return None
    root = node_state_dir(context.node_config, job_round.cfg)
    return DurableState(root, job_round.cfg.experiment_id, job_round.partition_id)


def open_job(msg: Message, context: Context) -> Job:
    """Resolve the round, build (or reuse) the model the rule trains, and load its starting point."""
    from finetune.logs import setup_logging

    setup_logging()
    job_round = read_round(msg, context)
    cfg = job_round.cfg
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    rule = get_rule(cfg.method.name).build_client(job_round)
    mirror = node_hub_mirror(context.node_config, cfg.hub_mirror)
    # a model a rule changes beyond its trainable arrays serves one rule in one experiment only
    owner = f"{cfg.method.name}:{cfg.experiment_id}" if rule.private_model else ""
    session = get_session(cfg, mirror, rule.adapter(), owner)
    received = from_record(unpack(msg.content.array_records[ARRAYS]))
    rule.load(session.model, received, session.baseline(rule.needs_base_weights))
    return Job(job_round, rule, session, context)


_SERVED_A_MESSAGE = False


def startup_seconds() -> float:
    """Seconds from this process's start to its first message's handler (interpreter, imports,
    Flower pulling the task); 0 for every later message of a process that stays (Ray actors, the
    warm node runtime)."""
    global _SERVED_A_MESSAGE
    if _SERVED_A_MESSAGE:
        return 0.0
    _SERVED_A_MESSAGE = True
    import psutil

    return max(time.time() - psutil.Process().create_time(), 0.0)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started, startup = time.perf_counter(), startup_seconds()
    job = open_job(msg, context)
    opened = time.perf_counter()
    data = job.training_data()
    prepared = time.perf_counter()
    server_round = job.round.instruction.server_round
    planned = plan_private_round(job.cfg, job.ledger(), len(data), server_round)
    privacy = planned[0] if planned is not None else None
    result = train_round(job, data, privacy)
    report = train_report(job, result, len(data))
    report.startup_seconds, report.setup_seconds = startup, opened - started
    report.data_seconds = prepared - opened
    if planned is not None:
        report.dp_noise_multiplier, report.dp_epsilon = planned[0].noise_multiplier, planned[1]
    upload = job.rule.finish(job.model, trainable_state(job.model), report)
    durable = job.durable()
    if durable is not None:
        durable.save(context.state, server_round, skip=job.rule.resynced_state)
    arrays = pack(to_record(upload, job.cfg.method.wire_dtype))
    # the whole handler (model set-up, data preparation, training, serialization): the part of a
    # round's wall time that is neither Flower's transport nor its scheduling
    report.handler_seconds = time.perf_counter() - started
    return Message(RecordDict({ARRAYS: arrays, METRICS: report.to_metrics()}), reply_to=msg)


def train_round(job: Job, data: datasets.Dataset, privacy: PrivateRound | None) -> TrainResult:
    """``train_local`` with the rule's optimizer and regularizer, resuming the node's optimizer
    state when ``train.keep_optimizer_state``."""
    cfg, node = job.cfg, job.round.node
    galore = job.rule.optimizer()
    keep = cfg.train.keep_optimizer_state
    result = train_local(
        job.model,
        data,
        job.session.task.collate,
        cfg.train,
        lr=job.round.instruction.lr,
        seed=job.seed(),
        regularizer=job.rule.regularizer(),
        optimizer=lambda model, lr: build_optimizer(model, lr, cfg, galore),
        optimizer_state=node.blob(OPTIMIZER_STATE) if keep else None,
        privacy=privacy,
    )
    if result.optimizer_state is not None:
        node.set_blob(OPTIMIZER_STATE, result.optimizer_state)
    return result


def train_report(job: Job, result: TrainResult, num_examples: int) -> TrainReport:
    return TrainReport(
        num_examples=num_examples,
        examples_seen=result.examples_seen,
        train_loss=result.loss,
        train_seconds=result.seconds,
        samples_per_second=result.samples_per_second,
        peak_memory_mb=result.peak_memory_mb,
        partition_id=job.round.partition_id,
        optimizer_state_bytes=result.optimizer_state_bytes,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation: this client's model on its own share of the validation split."""
    startup_seconds()  # a later train message of this process starts warm
    job = open_job(msg, context)
    data = job.session.eval_partition(job.round.partition_id)
    result = job.session.task.evaluate(job.model, data, job.cfg.train.eval_batch_size)
    cfg = job.cfg
    if cfg.evaluation.lm_eval.due(job.round.instruction.server_round, cfg.federation.num_rounds):
        from finetune.harness import Harness

        mirror = node_hub_mirror(context.node_config, cfg.hub_mirror)
        result |= Harness(cfg, mirror, getattr(job.session.task, "tokenizer", None)).score(job.model)
    metrics = MetricRecord({NUM_EXAMPLES: len(data), **result})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """A rule's one-off exchange before round 1 (Fed-SB: this node's gradient sums)."""
    startup_seconds()
    job = open_job(msg, context)
    data = job.training_data()
    arrays = job.rule.setup(job.model, data, job.session.task.collate)
    metrics = MetricRecord({NUM_EXAMPLES: len(data)})
    return Message(RecordDict({ARRAYS: pack(to_record(arrays)), METRICS: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """What the server asks before training: this node's partition and (where ranks differ) rank."""
    from finetune.logs import setup_logging

    startup_seconds()
    setup_logging(ml_stack=False)  # a resumed run's first message: its restore of kept state logs
    job_round = read_round(msg, context)
    rule = get_rule(job_round.cfg.method.name).client
    rank = rule.describe(
        job_round.cfg, job_round.partition_id, job_round.node, node_facts(context.node_config)
    )
    description = NodeDescription(job_round.partition_id, rank)
    return Message(RecordDict({METRICS: description.to_metrics()}), reply_to=msg)
