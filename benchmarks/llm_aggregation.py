"""The server's side of every rule at a real LLM's size: the engine of each rule around the
server model built from the model's published shapes with random weights (``model.weights=random``,
a bfloat16 base), answered by synthetic nodes whose replies hold exactly the arrays the engine
expects (what it sent them, moved by noise; mixed ranks where the rule allows them), for two
rounds. So the large-layer paths — dense float32 products, FlexLoRA's SVD, Fed-SB's truncated SVD,
LoRA-FAIR's correction, the merged-base rules' deltas — run at their real sizes.

    python -m benchmarks.llm_aggregation [--model llama_3_2_1b] [--targets all] [--rank 8]
        [--ranks 4,8,8,16] [--clients 4] [--rules fedit,flexlora,...] [--out FILE]

Each rule runs in its own process. Per round: seconds to configure (the payloads: FlexLoRA
decomposes here) and to aggregate, and the peak of the arrays numpy allocated while aggregating
(tracemalloc); per rule, the process's peak RSS (which includes building the model). Prints a
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Any, cast

import numpy as np

from benchmarks.llm_memory import PACKAGED_TOKENIZER, TARGETS


def synthetic_node(engine: Any, initial: dict[str, np.ndarray], contexts: dict[int, Any]) -> Any:
    """A node answering like a real one in shape: the real QUERY handler, gradient sums of the
    right shapes for Fed-SB's set-up, and for training what it was sent, moved by noise."""
    from flwr.app import MetricRecord, RecordDict

    from client_app.app import query
    from finetune.lora import lora_layers
    from finetune.wire import from_wire, to_wire
    from strategies.fed_sb import GRAD_SUFFIX
    from strategies.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SETUP_MESSAGE, TRAIN_LOSS

    def respond(message: Any) -> RecordDict:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        rng = np.random.default_rng(node)
        metrics = MetricRecord({NUM_EXAMPLES: 100, TRAIN_LOSS: 1.0})
        if kind == "query":
            return query(message, contexts[node]).content
        if kind == SETUP_MESSAGE:
            grads = {
                prefix + GRAD_SUFFIX: rng.standard_normal(
                    (initial[b].shape[0], initial[a].shape[1]), np.float32
                )
                for prefix, (a, b) in lora_layers(initial).items()
            }
            return RecordDict({ARRAYS: to_wire(grads), METRICS: metrics})
        sent = from_wire(message.content.array_records[ARRAYS])
        upload = {}
        for key, shape in engine.expected_shapes(node).items():
            base = sent.get(key)
            start = base if base is not None and base.shape == shape else np.zeros(shape, np.float32)
            upload[key] = start + 0.01 * rng.standard_normal(shape, np.float32)
        return RecordDict({ARRAYS: to_wire(upload), METRICS: metrics})

    return respond


def one_rule(name: str, model: str, targets: str, rank: int, ranks: str, clients: int) -> dict[str, Any]:
    from flwr.app import Context, RecordDict
    from flwr.serverapp import Grid

    import strategies  # noqa: F401  (registers the rules)
    from experiment_schema import compose_config
    from finetune.records import to_record
    from server_app.app import build_server_model
    from server_app.inprocess import InProcessGrid
    from server_app.loop import exchange
    from strategies import get_rule
    from strategies.protocol import Instruction

    rule = get_rule(name)
    overrides = [
        "model.weights=random", f"model.tokenizer={PACKAGED_TOKENIZER}", "model.dtype=bfloat16",
        f"model.lora_targets={TARGETS[targets]}", f"method.rank={rank}", f"method.alpha={2 * rank}",
        f"partition.num_clients={clients}", f"federation.min_train_clients={clients}",
        *([f"method.client_ranks=[{ranks}]"] if rule.heterogeneous_ranks else []),
    ]  # fmt: skip
    cfg = compose_config({"model": model, "dataset": "gsm8k", "partition": "iid", "method": name}, overrides)
    start = time.perf_counter()
    server = build_server_model(cfg, rule)
    engine = rule.build_strategy(cfg)
    initial = engine.initial_state(server.initial)
    build_seconds = time.perf_counter() - start
    contexts = {
        100 + p: Context(
            run_id=1, node_id=100 + p, node_config={"partition-id": p, "num-partitions": clients},
            state=RecordDict(), run_config={},
        )
        for p in range(clients)
    }  # fmt: skip
    grid = cast(Grid, InProcessGrid(list(contexts), synthetic_node(engine, initial, contexts)))
    arrays = to_record(initial)
    setup_seconds = time.perf_counter()
    arrays = engine.setup(grid, arrays, Instruction(cfg.to_json()).to_config())
    setup_seconds = time.perf_counter() - setup_seconds
    rounds = []
    for server_round in (1, 2):
        config = Instruction(cfg.to_json(), server_round=server_round, lr=1e-4).to_config()
        t0 = time.perf_counter()
        messages = list(engine.configure_train(server_round, arrays, config, grid))
        configure = time.perf_counter() - t0
        replies = exchange(grid, messages, timeout=600.0)
        tracemalloc.start()
        t0 = time.perf_counter()
        new, _ = engine.aggregate_train(server_round, replies)
        aggregate = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert new is not None, engine.rounds[server_round].rejected
        arrays = new
        stats = engine.rounds[server_round]
        rounds.append(
            {
                "configure_seconds": configure,
                "aggregate_seconds": aggregate,
                "aggregate_peak_mb": peak / 2**20,
                "bytes_down_mb": sum(stats.bytes_down.values()) / 1e6,
                "bytes_up_mb": sum(stats.bytes_up.values()) / 1e6,
                "rejected": dict(stats.rejected),
            }
        )
    return {
        "rule": name,
        "global_state_mb": sum(a.nbytes for a in initial.values()) / 1e6,
        "build_seconds": build_seconds,
        "setup_seconds": setup_seconds if rule.strategy.has_setup else None,
        "rounds": rounds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.model} (random weights, bf16 base), LoRA on {args.targets} at r={args.rank} (mixed ranks "
        f"{args.ranks} where the rule allows them), {args.clients} synthetic nodes, CPU:",
        "",
        "| rule | global state (MB) | round 1: configure / aggregate (s) | round 2 | aggregation peak, "
        "numpy (MB) | up per round (MB) | process peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['rule']} | failed: {r['failed']} | | | | | |")
            continue
        one, two = r["rounds"]
        setup = f" (set-up {r['setup_seconds']:.1f} s)" if r["setup_seconds"] is not None else ""
        cells = [
            r["rule"], f"{r['global_state_mb']:.1f}",
            f"{one['configure_seconds']:.2f} / {one['aggregate_seconds']:.2f}{setup}",
            f"{two['configure_seconds']:.2f} / {two['aggregate_seconds']:.2f}",
            f"{max(one['aggregate_peak_mb'], two['aggregate_peak_mb']):.0f}", f"{two['bytes_up_mb']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="llama_3_2_1b")
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ranks", default="4,8,8,16", help="per-node ranks for the rules that allow them")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rules", default="", help="comma-separated; default: every federated rule")
    parser.add_argument("--out", default="", help="write the rows as JSON here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = one_rule(args.one, args.model, args.targets, args.rank, args.ranks, args.clients)
        print("RESULT " + json.dumps(result))
        return
    import strategies

    names = (
        args.rules.split(",")
        if args.rules
        else sorted(n for n, r in strategies.RULES.items() if not r.centralized)
    )
    rows = []
    for name in names:
        settings = ["--model", args.model, "--targets", args.targets, "--rank", str(args.rank),
                    "--ranks", args.ranks, "--clients", str(args.clients)]  # fmt: skip
        command = [sys.executable, "-m", "benchmarks.llm_aggregation", "--one", name, *settings]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            reason = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
            if out.returncode == -9:  # what the kernel's out-of-memory killer sends
                reason = "killed (SIGKILL): out of memory"
            print(f"{name}: failed ({reason})\n{out.stderr[-2000:]}", file=sys.stderr)
            rows.append({"rule": name, "failed": reason})
        else:
            rows.append(json.loads(line[len("RESULT ") :]))
            print(f"{name}: done", file=sys.stderr, flush=True)
        if args.out:  # after every rule: a long sweep stopped part-way keeps what it measured
            with open(args.out, "w") as handle:
                json.dump({"settings": vars(args), "rows": rows}, handle, indent=1)
    print("\n" + table(rows, args) + "\n")


if __name__ == "__main__":
    main()
