"""ServerApp: compose and validate the experiment, then run the federation and save results."""

from __future__ import annotations

import logging
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from peft import PeftModel
from safetensors.torch import save_file

from finetune.config import ConfigError, ExperimentConfig, higher_is_better
from finetune.data import PartitionedDataset, load_eval_split, load_train_split
from finetune.hub import hub_mirror
from finetune.logs import setup_logging
from finetune.models import build_model, device, trainable_parameter_count
from finetune.records import from_record, to_record
from finetune.state import base_weights, load_global_state, trainable_state
from finetune.tasks import Task, build_task
from server_app.centralized import run_centralized
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
    partitions = PartitionedDataset(train_raw, cfg)
    sizes = partitions.sizes()
    log.info(
        "partition %s: examples per client %s; by %s: %s",
        cfg.partition.name, sizes, partitions.field or "nothing (iid)", partitions.histograms(),
    )  # fmt: skip
    if cfg.partition.feature_shift:
        shifts = cfg.partition.feature_shift
        log.info("feature shift per client: %s", [shifts[i % len(shifts)] for i in range(len(sizes))])

    model = build_model(STRATEGIES[cfg.method.name].server_model_config(cfg), mirror).to(device())
    task = build_task(cfg, mirror)
    eval_data = task.prepare(eval_raw)
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
    strategy = build_strategy(cfg)
    base = base_weights(model) if strategy.merges_into_base else {}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        load_global_state(model, from_record(arrays), init_state, base)
        return task.evaluate(model, eval_data, cfg.train.eval_batch_size)

    strategy.summary()
    evaluate_fn = evaluate_global
    if strategy.evaluate_on_clients:  # personalised: part of every model never leaves its client
        eval_sizes = [len(share) for share in partitions.shares_of(eval_raw)]
        if empty := [client for client, size in enumerate(eval_sizes) if not size]:
            raise ConfigError(
                f"personalised evaluation: clients {empty} get no examples of the {len(eval_raw)}-example "
                "validation split; use fewer clients, a larger alpha or more validation examples"
            )
        log.info("personalised evaluation on the clients' validation shares %s", eval_sizes)
        evaluate_fn = partial(evaluate_on_clients, grid, strategy, cfg)
    if strategy.centralized:  # the upper bound: the same training code on the union of the data
        log.info("centralized baseline: training on all %d examples, no clients", len(train_raw))
        union = task.prepare(train_raw)
        final = run_centralized(cfg, model, task.collate, union, evaluate_fn, recorder)
    else:
        initial = strategy.initial_state(init_state)
        central_dp = central_dp_wrapper(cfg, strategy)
        final = run_federation(grid, strategy, cfg, to_record(initial), evaluate_fn, recorder, central_dp)

    load_global_state(model, from_record(final), init_state, base)
    saved = save_final_model(model, task, strategy, recorder) if cfg.save_adapter else None
    recorder.write_summary(summarize(cfg, recorder, sizes, trainable, time.perf_counter() - start, saved))


def central_dp_wrapper(cfg: ExperimentConfig, strategy: FederatedStrategy) -> Strategy | None:
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


def save_final_model(
    model: torch.nn.Module,
    task: Task,
    strategy: FederatedStrategy,
    recorder: RunRecorder,
) -> Path | None:
    """The adapter (peft's ``save_pretrained``), or the whole model where the result is more
    than an adapter (full fine-tuning; LoRA merged into a base that absorbed FLoRA / FedEx updates)."""
    if strategy.evaluate_on_clients:
        log.info("no global model saved: %s keeps part of each model on its client", strategy.name)
        return None
    if strategy.full_finetune or strategy.merges_into_base:
        folder = recorder.model_dir
        model = model.merge_and_unload() if isinstance(model, PeftModel) else model
    else:
        folder = recorder.adapter_dir
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:  # a plain torch model (EfficientNet-Lite0): its weights as safetensors
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))
    task.save(folder)
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
    best = pick(rows, key=lambda row: row[key])
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
        "final": {k: v for k, v in rows[-1].items() if k.startswith("eval_") and k != "eval_seconds"},
        "best": {"round": best["round"], key: best[key]},
        "total_bytes_down": sum(row["bytes_down"] for row in rows),
        "total_bytes_up": sum(row["bytes_up"] for row in rows),
        "trainable_parameters": trainable,
        "partition_sizes": sizes,
        "wall_seconds": seconds,
        "adapter_dir": str(saved) if saved == recorder.adapter_dir else None,
        "model_dir": str(saved) if saved == recorder.model_dir else None,
    }
