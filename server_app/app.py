"""ServerApp: compose and validate the experiment, then run the federation and save results."""

from __future__ import annotations

import logging
import time
import traceback
from functools import partial

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from finetune.config import ExperimentConfig
from finetune.data import (
    PartitionedDataset,
    label_histogram,
    load_eval_split,
    load_train_split,
    tokenize,
)
from finetune.hub import hub_mirror
from finetune.logs import setup_logging
from finetune.models import build_model, load_tokenizer, trainable_parameter_count
from finetune.records import from_record, to_record
from finetune.state import load_trainable_state, trainable_state
from finetune.training import evaluate
from server_app.loop import evaluate_on_clients, run_federation
from server_app.results import RunRecorder
from server_app.run_config import experiment_from_run_config
from strategies import STRATEGIES, FederatedStrategy

log = logging.getLogger(__name__)
app = ServerApp()


def build_strategy(cfg: ExperimentConfig) -> FederatedStrategy:
    rule = STRATEGIES[cfg.method.name]
    return rule(
        **rule.options(cfg),
        fraction_train=cfg.federation.fraction_train,
        min_train_nodes=cfg.federation.min_train_clients,
        min_replies=cfg.federation.min_replies,
        weighting=cfg.method.weighting,
        wire_dtype=cfg.method.wire_dtype,
        seed=cfg.seed,
        connect_timeout_s=cfg.federation.connect_timeout_s,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = experiment_from_run_config(context.run_config)
    recorder = RunRecorder.create(cfg)
    log.info("run folder %s", recorder.folder)
    try:
        run_experiment(grid, cfg, recorder)
    except BaseException as error:
        (recorder.folder / "error.txt").write_text("".join(traceback.format_exception(error)))
        raise


def run_experiment(grid: Grid, cfg: ExperimentConfig, recorder: RunRecorder) -> None:
    """Everything that can fail on bad input happens before the first round."""
    start = time.perf_counter()
    mirror = hub_mirror(cfg.hub_mirror)
    eval_raw = load_eval_split(cfg.dataset, mirror, cfg.seed)
    train_raw = load_train_split(cfg.dataset, mirror, cfg.seed)
    partitions = PartitionedDataset(train_raw, cfg.partition, cfg.dataset.label_field)
    sizes = partitions.sizes()
    histograms = [
        label_histogram(partitions.partition(i), cfg.dataset.label_field, cfg.dataset.num_labels)
        for i in range(cfg.partition.num_clients)
    ]
    log.info("partition %s: examples per client %s; labels %s", cfg.partition.name, sizes, histograms)

    model = build_model(STRATEGIES[cfg.method.name].server_model_config(cfg), mirror)
    tokenizer = load_tokenizer(cfg, mirror)
    eval_data = tokenize(eval_raw, cfg.dataset, tokenizer, cfg.model.max_length)
    trainable, total = trainable_parameter_count(model)
    log.info(
        "%s: %d trainable of %d parameters (%.2f%%); server evaluates with %d torch threads",
        cfg.model.source,
        trainable,
        total,
        100 * trainable / total,
        torch.get_num_threads(),
    )

    init_state = trainable_state(model)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        load_trainable_state(model, {**init_state, **from_record(arrays)})
        return evaluate(model, eval_data, tokenizer, cfg.train.eval_batch_size, cfg.dataset.metrics)

    strategy = build_strategy(cfg)
    strategy.summary()
    evaluate_fn = evaluate_global
    if strategy.evaluate_on_clients:  # personalised: part of every model never leaves its client
        eval_sizes = PartitionedDataset(eval_raw, cfg.partition, cfg.dataset.label_field).sizes()
        log.info("personalised evaluation on the clients' validation shares %s", eval_sizes)
        evaluate_fn = partial(evaluate_on_clients, grid, strategy, cfg)
    initial = {k: v for k, v in trainable_state(model).items() if strategy.client_uploads(k)}
    final = run_federation(grid, strategy, cfg, to_record(initial), evaluate_fn, recorder)

    load_trainable_state(model, {**init_state, **from_record(final)})
    save_adapter = cfg.save_adapter and not strategy.evaluate_on_clients
    if save_adapter:
        model.save_pretrained(recorder.adapter_dir)
        tokenizer.save_pretrained(recorder.adapter_dir)
    elif strategy.evaluate_on_clients:
        log.info("no global adapter saved: %s keeps part of each model on its client", cfg.method.name)
    recorder.write_summary(
        summarize(cfg, recorder, sizes, trainable, time.perf_counter() - start, save_adapter)
    )


def summarize(
    cfg: ExperimentConfig,
    recorder: RunRecorder,
    sizes: list[int],
    trainable: int,
    seconds: float,
    saved_adapter: bool,
) -> dict[str, object]:
    key = f"eval_{cfg.dataset.main_metric}"
    rows = recorder.rows
    best = max(rows, key=lambda row: row[key])
    return {
        "status": "completed",
        "run_dir": str(recorder.folder),
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "partition": cfg.partition.name,
        "num_clients": cfg.partition.num_clients,
        "rounds": cfg.federation.num_rounds,
        "main_metric": cfg.dataset.main_metric,
        "final": {k: v for k, v in rows[-1].items() if k.startswith("eval_")},
        "best": {"round": best["round"], key: best[key]},
        "total_bytes_down": sum(row["bytes_down"] for row in rows),
        "total_bytes_up": sum(row["bytes_up"] for row in rows),
        "trainable_parameters": trainable,
        "partition_sizes": sizes,
        "wall_seconds": seconds,
        "adapter_dir": str(recorder.adapter_dir) if saved_adapter else None,
    }
