"""Memory benchmark: optimizer state and peak memory of one client's round, per training mode.

    python -m benchmarks.memory [--model minilm] [--steps 10] [--modes lora,full,galore4,...]

Each mode runs in its own process (a clean RSS high-water mark) through the real ``train_local``
on the default recipe's client 0 (MiniLM, SST-2, batch 16): LoRA r=8 (FedIT), AdamW full
fine-tuning of query/value + head (``full``), GaLore at rank 4, 8 and 16 on the same weights.
Prints figures; asserts nothing (targets live here, not in timed tests).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = {  # name -> (method, overrides)
    "lora": ("fedit", []),
    "full-adamw": ("full", []),
    "galore-r4": ("galore", ["method.rank=4"]),
    "galore-r8": ("galore", ["method.rank=8"]),
    "galore-r16": ("galore", ["method.rank=16"]),
    "full-all-adamw": ("full", ["method.full_scope=all"]),
    "galore-all-r8": ("galore", ["method.full_scope=all", "method.rank=8"]),
}


def measure(mode: str, model: str, steps: int) -> dict[str, float]:
    """One mode, in this process: build, train ``steps`` steps, report memory and state bytes."""
    import torch
    from flwr.app import RecordDict

    from experiment_schema import compose_config
    from finetune.data import PartitionedDataset, load_train_split
    from finetune.hub import default_hub_mirror, hub_mirror
    from finetune.memory import peak_memory_mb, reset_peak_memory
    from finetune.models import build_model, trainable_parameter_count
    from finetune.optim import build_optimizer, galore_targets
    from finetune.tasks import build_task
    from finetune.training import train_local
    from strategies import get_rule
    from strategies.client import ClientRound, NodeState
    from strategies.protocol import Instruction

    method, overrides = MODES[mode]
    cfg = compose_config(
        {"method": method, "model": model}, [*overrides, f"train.local_steps={steps}", "model.max_length=128"]
    )
    mirror = hub_mirror(default_hub_mirror())
    task = build_task(cfg, mirror)
    train = load_train_split(cfg.dataset, mirror, cfg.seed)
    data = task.prepare(PartitionedDataset(train, cfg).partition(0), client=0)
    client = get_rule(method).build_client(
        ClientRound(cfg, Instruction(cfg.to_json()), 0, NodeState(RecordDict()))
    )
    adapter, galore = client.adapter(), client.optimizer()
    reset_peak_memory()
    before = peak_memory_mb()
    net = build_model(cfg, mirror, adapter)
    loaded = peak_memory_mb()
    captured: dict[str, torch.optim.Optimizer] = {}

    def factory(m: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        captured["opt"] = build_optimizer(m, lr, cfg, galore)
        return captured["opt"]

    import psutil

    at_start = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    result = train_local(net, data, task.collate, cfg.train, lr=cfg.peak_lr, seed=0, optimizer=factory)
    seconds = time.perf_counter() - start
    targets = set(galore_targets(net, cfg, adapter.full_scope == "all")) if adapter.kind == "full" else set()
    params = dict(net.named_parameters())
    on_targets = sum(
        t.numel() * t.element_size()
        for name in targets
        for t in _state_tensors(captured["opt"].state.get(params[name], {}))
    )
    trainable, _ = trainable_parameter_count(net)
    return {
        "trainable_params": trainable,
        "optimizer_state_mb": result.optimizer_state_bytes / 2**20,
        "optimizer_state_on_targeted_weights_mb": on_targets / 2**20,
        "targeted_weight_mb": sum(params[n].numel() * 4 for n in targets) / 2**20,
        "peak_rss_mb": result.peak_memory_mb,
        "training_increment_mb": result.peak_memory_mb - at_start,
        "model_loaded_rss_mb": loaded,
        "rss_before_model_mb": before,
        "seconds_per_step": seconds / steps,
    }


def _state_tensors(state: dict) -> list:
    from finetune.optim import _tensors

    return list(_tensors(state))


def targeted(row: dict[str, float]) -> str:
    if not row["targeted_weight_mb"]:
        return "— (LoRA factors only)"
    return f"{row['optimizer_state_on_targeted_weights_mb']:.2f} (weights: {row['targeted_weight_mb']:.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.model, args.steps)))
        return
    rows = {}
    for mode in args.modes.split(","):
        command = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--one",
            mode,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows[mode] = json.loads(line[len("RESULT ") :])
    print(
        f"\nOne client round ({args.steps} steps × batch 16, {args.model}, SST-2 client 0), a process each:\n"
    )
    print("| mode | trainable | optimizer state MB | on projected weights | peak RSS MB (+train) | s/step |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['trainable_params']:,} | {r['optimizer_state_mb']:.2f} | "
            f"{targeted(r)} | {r['peak_rss_mb']:.0f} (+{r['training_increment_mb']:.0f}) | "
            f"{r['seconds_per_step']:.3f} |"
        )
    for mode in (m for m in rows if m.startswith("galore")):
        full = rows.get("full-all-adamw" if "-all-" in mode else "full-adamw")
        if full:
            projected = rows[mode]["optimizer_state_on_targeted_weights_mb"]
            print(
                f"{mode}: optimizer state on the projected weights "
                f"{projected / full['optimizer_state_on_targeted_weights_mb']:.3f} × AdamW's, "
                f"in all {rows[mode]['optimizer_state_mb'] / full['optimizer_state_mb']:.3f} × AdamW's"
            )


if __name__ == "__main__":
    main()
