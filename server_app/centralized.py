"""The centralized baseline's round loop: ``train_local`` on the union of the clients' data."""

from __future__ import annotations

import dataclasses
import math
import time

import datasets
import numpy as np
import torch
from flwr.app import ArrayRecord

from experiment_schema import ExperimentConfig
from finetune.data import Collate
from finetune.records import to_record
from finetune.schedule import round_lr
from finetune.state import trainable_state
from finetune.training import train_local
from server_app.loop import Evaluate
from server_app.results import RoundRecord, RunRecorder


def centralized_train_config(cfg: ExperimentConfig, num_examples: int) -> ExperimentConfig:
    """Per round, as many optimizer steps of the same batch size as the federation's sampled
    clients run together; the optimizer state carries across rounds."""
    clients = cfg.federation.clients_per_round(cfg.partition.num_clients)
    if cfg.train.local_steps:
        steps = clients * cfg.train.local_steps
    else:  # local epochs over the sampled clients' share of the data
        share = num_examples * clients / cfg.partition.num_clients
        steps = cfg.train.local_epochs * math.ceil(share / cfg.train.batch_size)
    train = dataclasses.replace(cfg.train, local_steps=steps, keep_optimizer_state=True)
    return dataclasses.replace(cfg, train=train)


def run_centralized(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    collate: Collate,
    train_data: datasets.Dataset,
    evaluate: Evaluate,
    recorder: RunRecorder,
) -> ArrayRecord:
    """Train ``cfg.federation.num_rounds`` rounds on ``train_data``, evaluating after each."""
    run = centralized_train_config(cfg, len(train_data))
    start = time.perf_counter()
    initial_metrics = evaluate(0, to_record(trainable_state(model)))
    elapsed = time.perf_counter() - start
    recorder.log_round(RoundRecord(0, initial_metrics, eval_seconds=elapsed, seconds=elapsed))
    optimizer_state: np.ndarray | None = None
    for server_round in range(1, cfg.federation.num_rounds + 1):
        round_start = time.perf_counter()
        lr = round_lr(cfg.train, server_round, cfg.federation.num_rounds, peak=cfg.peak_lr)
        result = train_local(
            model, train_data, collate, run.train, lr=lr, seed=cfg.seed * 1_000_003 + server_round * 1009,
            optimizer_state=optimizer_state,
        )  # fmt: skip
        optimizer_state = result.optimizer_state
        train_end = time.perf_counter()
        metrics = (
            evaluate(server_round, to_record(trainable_state(model)))
            if cfg.evaluation_due(server_round)
            else {}
        )
        recorder.log_round(
            RoundRecord(
                server_round,
                metrics,
                train_loss=result.loss,
                lr=lr,
                examples_seen=result.examples_seen,
                slowest_client_seconds=result.seconds,
                peak_client_memory_mb=result.peak_memory_mb,
                optimizer_state_bytes=result.optimizer_state_bytes,
                train_phase_seconds=train_end - round_start,
                eval_seconds=time.perf_counter() - train_end,
                seconds=time.perf_counter() - round_start,
            )
        )
    return to_record(trainable_state(model))
