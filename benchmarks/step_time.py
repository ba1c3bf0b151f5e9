"""Seconds per training step of an image model by input size: what sized the CPU benchmark's
CIFAR-10 cells (EfficientNet-Lite0 at 96 pixels).

    python -m benchmarks.step_time --sizes 224,128,96,64 --methods fedit,full

One torch thread (a Ray worker's share of a 2-core machine), batch 16, random inputs, AdamW on what
the rule trains; the median of ``--steps`` steps after one warm-up step. Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import time


def step_seconds(method: str, model: str, dataset: str, size: int, steps: int) -> tuple[float, int]:
    import torch
    from flwr.app import RecordDict

    from experiment_schema import compose_config
    from finetune.hub import default_hub_mirror, hub_mirror
    from finetune.models import build_model
    from strategies import get_rule
    from strategies.client import ClientRound, NodeState
    from strategies.protocol import Instruction

    cfg = compose_config({"method": method, "model": model, "dataset": dataset}, [f"model.image_size={size}"])
    client = get_rule(method).build_client(
        ClientRound(cfg, Instruction(cfg.to_json()), 0, NodeState(RecordDict()))
    )
    net = build_model(cfg, hub_mirror(default_hub_mirror()), client.adapter()).train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images, labels = torch.randn(16, 3, size, size), torch.randint(0, cfg.dataset.num_labels, (16,))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        output = net(images)
        logits = output.logits if hasattr(output, "logits") else output
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step allocates
            times.append(time.perf_counter() - start)
    return statistics.median(times), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--methods", default="fedit,full")
    parser.add_argument("--sizes", default="224,128,96,64")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    import strategies  # noqa: F401  (registers every rule's config)

    torch.set_num_threads(1)
    print("| method | pixels | s/step (batch 16, 1 thread) | trainable parameters |\n|---|---|---|---|")
    for method in args.methods.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            seconds, trainable = step_seconds(method, args.model, args.dataset, size, args.steps)
            print(f"| `{method}` | {size} | {seconds:.3f} | {trainable:,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
