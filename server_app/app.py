"""ServerApp: compose and validate the experiment, then run the federation and save results."""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from peft import PeftModel
from safetensors.torch import save_file

from experiment_schema import ConfigError, ExperimentConfig, higher_is_better
from finetune.data import PartitionedDataset, load_eval_split, load_train_split
from finetune.hub import hub_mirror
from finetune.logs import add_debug_file, setup_logging
from finetune.lora import BASE_DELTA_SUFFIX, is_base_delta
from finetune.models import BASE_DELTAS_FILE, build_model, fold_latent, trainable_parameter_count
from finetune.precision import device
from finetune.records import from_record, to_record
from finetune.spec import AdapterSpec
from finetune.state import base_weights, load_global_state, lora_base_layers, merged_delta, trainable_state
from finetune.tasks import Task, build_task
from server_app.centralized import run_centralized
from server_app.checkpoint import Checkpoint, latest_checkpoint, refuse_unless_resumable
from server_app.faults import Fault, FaultyGrid
from server_app.loop import Evaluate, evaluate_on_clients, run_federation
from server_app.results import RunRecorder
from server_app.run_config import FAULT_KEY, RESUME_KEY, experiment_from_run_config
from server_app.waits import retry_missing_objects_sooner
from strategies import Rule, get_rule
from strategies.engine import Engine

log = logging.getLogger(__name__)
app = ServerApp()


def build_strategy(cfg: ExperimentConfig) -> Engine:
    return get_rule(cfg.method.name).build_strategy(cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    retry_missing_objects_sooner()
    cfg = experiment_from_run_config(context.run_config)
    fault = Fault.parse(str(context.run_config.get(FAULT_KEY, "")))
    if fault is not None:
        log.warning(
            "fault injection (%s=%s): the replies of partition %d's node are altered",
            FAULT_KEY,
            fault,
            fault.partition,
        )
        grid = FaultyGrid(grid, fault)  # type: ignore[assignment]  # a Grid in all but name
    resume_from = str(context.run_config.get(RESUME_KEY, ""))
    resume = resumable_checkpoint(Path(resume_from), cfg) if resume_from else None
    if resume is None:
        recorder = RunRecorder.create(cfg)
    else:
        recorder = RunRecorder.reopen(Path(resume_from), cfg, rows_through(Path(resume_from), resume))
    add_debug_file(recorder.folder / "debug.log")  # third-party warnings and log records, ours at DEBUG
    log.info("run folder %s", recorder.folder)
    try:
        run_experiment(grid, cfg, recorder, resume)
    except BaseException as error:
        (recorder.folder / "error.txt").write_text("".join(traceback.format_exception(error)))
        raise


@dataclass
class ServerData:
    """The server's view of the data: the clients' partitions and its own evaluation split."""

    train: datasets.Dataset
    partitions: PartitionedDataset
    sizes: list[int]
    eval_raw: datasets.Dataset


@dataclass
class ServerModel:
    """The model whose trainable state is the global state, with what evaluating it needs."""

    model: torch.nn.Module
    adapter: AdapterSpec
    task: Task
    initial: dict[str, np.ndarray]  # its seeded trainable init
    base: dict[str, torch.Tensor]  # the pristine weights under its LoRA layers (merged-base rules)

    def load(self, arrays: ArrayRecord) -> None:
        load_global_state(self.model, from_record(arrays), self.initial, self.base)


def resumable_checkpoint(folder: Path, cfg: ExperimentConfig) -> Checkpoint:
    """The newest intact checkpoint of ``folder``, refused when ``cfg`` is another experiment."""
    checkpoint = latest_checkpoint(folder)
    refuse_unless_resumable(folder, checkpoint.round, checkpoint.config, cfg)
    return checkpoint


def rows_through(folder: Path, checkpoint: Checkpoint) -> list[dict[str, object]]:
    """The metrics rows up to the checkpoint's round: ``metrics.jsonl``'s (they carry the
    checkpoint's own cost), else the checkpoint's copy."""
    logged: dict[int, dict[str, object]] = {}
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            logged[int(row["round"])] = row
    return [logged.get(int(row["round"]), row) for row in checkpoint.rows]


def run_experiment(
    grid: Grid, cfg: ExperimentConfig, recorder: RunRecorder, resume: Checkpoint | None = None
) -> None:
    """Everything that can fail on bad input happens before the first round."""
    start, started_at = time.perf_counter(), time.time()
    rule = get_rule(cfg.method.name)
    if cfg.model.random_weights:
        log.warning(
            "model.weights=random: %s is built with random weights; this run measures memory and "
            "time, and its metrics mean nothing",
            cfg.model.name,
        )
    data = load_server_data(cfg)
    server = build_server_model(cfg, rule)
    strategy = rule.build_strategy(cfg)
    strategy.summary()
    initial = strategy.initial_state(server.initial)
    if any(is_base_delta(key) for key in initial):
        server.base = base_weights(server.model)
    evaluate = make_evaluator(grid, cfg, rule, strategy, server, data)
    setup_seconds = time.perf_counter() - start
    if rule.centralized:  # the upper bound: the same training code on the union of the data
        log.info("centralized baseline: training on all %d examples, no clients", len(data.train))
        union = server.task.prepare(data.train)
        final = run_centralized(cfg, server.model, server.task.collate, union, evaluate, recorder)
    else:
        central_dp = central_dp_wrapper(cfg, strategy)
        final = run_federation(
            grid, strategy, cfg, to_record(initial), evaluate, recorder, central_dp, resume
        )
    server.load(final)
    saved = save_final_model(server, rule, recorder) if cfg.save_adapter else None
    trainable, _ = trainable_parameter_count(server.model)
    summary = summarize(cfg, recorder, data.sizes, trainable, time.perf_counter() - start, saved)
    # when the ServerApp started (unix time) and how long its data and model set-up took: a
    # sweep splits a job's wall time with them
    if isinstance(grid, FaultyGrid):  # a fault-injection run says so wherever its results go
        summary |= {"injected_fault": str(grid.fault), "faults_injected": [list(f) for f in grid.injected]}
    recorder.write_summary(summary | {"started_at": started_at, "setup_seconds": setup_seconds})


def load_server_data(cfg: ExperimentConfig) -> ServerData:
    """Load and partition the data (refusing a partition that leaves a client empty)."""
    mirror = hub_mirror(cfg.hub_mirror)
    eval_raw = load_eval_split(cfg.dataset, mirror, cfg.seed)
    train_raw = load_train_split(cfg.dataset, mirror, cfg.seed)
    partitions = PartitionedDataset(train_raw, cfg)
    sizes = partitions.sizes()
    if len(sizes) <= 20:
        log.info(
            "partition %s: examples per client %s; by %s: %s",
            cfg.partition.name, sizes, partitions.field or "nothing (iid)", partitions.histograms(),
        )  # fmt: skip
    else:  # a line per client would drown the log
        log.info(
            "partition %s over %d clients: examples per client min %d, median %d, max %d",
            cfg.partition.name, len(sizes), min(sizes), int(np.median(sizes)), max(sizes),
        )  # fmt: skip
    if cfg.partition.feature_shift:
        shifts = cfg.partition.feature_shift
        log.info("feature shift per client: %s", [shifts[i % len(shifts)] for i in range(len(sizes))])
    return ServerData(train_raw, partitions, sizes, eval_raw)


def build_server_model(cfg: ExperimentConfig, rule: Rule) -> ServerModel:
    mirror = hub_mirror(cfg.hub_mirror)
    adapter = rule.server_adapter(cfg)
    on = torch.device("cpu") if cfg.evaluation.server_device == "cpu" else device()
    model = build_model(cfg, mirror, adapter, on=on).to(on)
    trainable, total = trainable_parameter_count(model)
    log.info(
        "%s: %d trainable of %d parameters (%.2f%%); server evaluates with %d torch threads",
        cfg.model.source, trainable, total, 100 * trainable / total, torch.get_num_threads(),
    )  # fmt: skip
    return ServerModel(model, adapter, build_task(cfg, mirror), trainable_state(model), {})


def make_evaluator(
    grid: Grid,
    cfg: ExperimentConfig,
    rule: Rule,
    strategy: Engine,
    server: ServerModel,
    data: ServerData,
) -> Evaluate:
    """Server-side evaluation of the global model, or — for personalised rules, where part of
    every model never leaves its client — the clients' evaluation of their own models. The
    ``evaluation.lm_eval`` tasks are checked here, before any training."""
    harness = None
    if cfg.evaluation.lm_eval.tasks:
        from finetune.harness import Harness

        harness = Harness(cfg, hub_mirror(cfg.hub_mirror), getattr(server.task, "tokenizer", None))
        harness.check()
    if strategy.evaluate_on_clients:  # personalised rules, or evaluation.where=clients
        eval_sizes = [len(share) for share in data.partitions.shares_of(data.eval_raw)]
        if empty := [client for client, size in enumerate(eval_sizes) if not size]:
            raise ConfigError(
                f"personalised evaluation: clients {empty} get no examples of the "
                f"{len(data.eval_raw)}-example validation split; use fewer clients, a larger alpha or "
                "more validation examples"
            )
        log.info("personalised evaluation on the clients' validation shares %s", eval_sizes)
        return partial(evaluate_on_clients, grid, strategy, cfg)
    eval_data = server.task.prepare(data.eval_raw)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        server.load(arrays)
        metrics = server.task.evaluate(server.model, eval_data, cfg.train.eval_batch_size)
        if harness is not None and cfg.evaluation.lm_eval.due(server_round, cfg.federation.num_rounds):
            metrics |= harness.score(server.model)
        return metrics

    return evaluate_global


def central_dp_wrapper(cfg: ExperimentConfig, strategy: Engine) -> Strategy | None:
    """Flower's server-side fixed-clipping wrapper, for ``privacy.mode=central``."""
    if not (cfg.privacy.enabled and cfg.privacy.mode == "central"):
        return None
    sampled = cfg.federation.clients_per_round(cfg.partition.num_clients)
    log.info(
        "central DP: updates clipped to %.3g, noise multiplier %.3g over %d clients per round",
        cfg.privacy.clip_norm, cfg.privacy.noise_multiplier, sampled,
    )  # fmt: skip
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, cfg.privacy.noise_multiplier, cfg.privacy.clip_norm, sampled
    )


def save_final_model(server: ServerModel, rule: Rule, recorder: RunRecorder) -> Path | None:
    """The adapter (peft's ``save_pretrained``), or the whole model where the result is more
    than an adapter (full fine-tuning; LoRA merged into a base that absorbed FLoRA / FedEx updates)."""
    if rule.personalised:
        log.info("no global model saved: %s keeps part of each model on its client", rule.name)
        return None
    model = server.model
    if server.adapter.kind == "lora_latent":
        fold_latent(model)  # the same function as a plain LoRA adapter: (A, R) -> R A
    additive = {
        prefix + BASE_DELTA_SUFFIX: delta.cpu().contiguous()
        for prefix, layer in lora_base_layers(server.model).items()
        if (delta := merged_delta(layer)) is not None
    }
    # a quantized / low-precision base keeps its merged updates beside the weights: merging them
    # in would re-round them, so the result is the adapter plus those deltas
    if server.adapter.kind == "full" or (server.base and not additive):
        folder = recorder.model_dir
        model = model.merge_and_unload() if isinstance(model, PeftModel) else model
    else:
        folder = recorder.adapter_dir
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)  # type: ignore[operator]
    else:  # a plain torch model (EfficientNet-Lite0): its weights as safetensors
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))
    if additive:
        save_file(additive, str(folder / BASE_DELTAS_FILE))
    server.task.save(folder)
    return folder


def summarize(
    cfg: ExperimentConfig,
    recorder: RunRecorder,
    sizes: list[int],
    trainable: int,
    seconds: float,
    saved: Path | None,
) -> dict[str, object]:
    key = f"eval_{cfg.dataset.main_metric}"
    rows = recorder.rows
    pick = max if higher_is_better(cfg.dataset.main_metric) else min
    best = pick((row for row in rows if row.get(key) is not None), key=lambda row: row[key])
    scored = [row for row in rows if any(k.startswith("eval_") and k != "eval_seconds" for k in row)]
    final = scored[-1] if scored else rows[-1]
    return {
        "status": "completed",
        **({"stopped": recorder.stopped} if recorder.stopped else {}),
        "run_dir": str(recorder.folder),
        "method": cfg.method.name,
        "model": cfg.model.name,
        "weights": cfg.model.weights,
        "dataset": cfg.dataset.name,
        "partition": cfg.partition.name,
        "num_clients": cfg.partition.num_clients,
        "rounds": cfg.federation.num_rounds,
        "main_metric": cfg.dataset.main_metric,
        "final": {k: v for k, v in final.items() if k.startswith("eval_") and k != "eval_seconds"},
        "final_round": final["round"],
        "best": {"round": best["round"], key: best[key]},
        "total_bytes_down": sum(row["bytes_down"] for row in rows),
        "total_bytes_up": sum(row["bytes_up"] for row in rows),
        "trainable_parameters": trainable,
        "server_peak_rss_mb": max((row.get("server_peak_rss_mb") or 0.0 for row in rows), default=None),
        "partition_sizes": sizes,
        "wall_seconds": seconds,
        "adapter_dir": str(saved) if saved == recorder.adapter_dir else None,
        "model_dir": str(saved) if saved == recorder.model_dir else None,
    }
