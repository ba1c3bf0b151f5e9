"""Aggregation benchmark: HLoRA's QR-compact SVD vs the dense SVD, and FFA-LoRA's bytes vs FedIT's.

    python -m benchmarks.aggregation [--dim 4096] [--clients 10] [--rank 16] [--repeat 3]

Prints figures; asserts nothing about speed (targets live here, not in timed tests).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from finetune.records import to_record
from strategies import get_rule
from strategies.flexlora import flexlora_aggregate
from strategies.hlora import hlora_aggregate

Factors = tuple[np.ndarray, np.ndarray]


def _best_of(repeat: int, fn: Callable[[], Factors]) -> tuple[float, Factors]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def svd_benchmark(dim: int, clients: int, rank: int, repeat: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    As = [rng.normal(size=(rank, dim)) / np.sqrt(dim) for _ in range(clients)]
    Bs = [rng.normal(size=(dim, rank)) for _ in range(clients)]
    weights = rng.integers(100, 1000, clients).tolist()
    scales = [2.0] * clients

    def dense() -> tuple[np.ndarray, np.ndarray]:  # FlexLoRA: SVD of the dense d × d update
        return flexlora_aggregate(As, Bs, weights, scales, rank)

    def compact() -> tuple[np.ndarray, np.ndarray]:  # HLoRA: QR-compact SVD of the factors
        return hlora_aggregate(As, Bs, weights, scales, rank)

    dense_s, (A_d, B_d) = _best_of(repeat, dense)
    compact_s, (A_c, B_c) = _best_of(repeat, compact)
    delta_d, delta_c = B_d @ A_d, B_c @ A_c
    return {
        "dense_seconds": dense_s,
        "compact_seconds": compact_s,
        "speedup": dense_s / compact_s,
        "max_abs_error": float(np.abs(delta_d - delta_c).max()),
        "relative_error": float(np.linalg.norm(delta_d - delta_c) / np.linalg.norm(delta_d)),
    }


def bytes_benchmark(dim: int, rank: int) -> dict[str, float]:
    """Bytes of one round's broadcast to one client for FedIT vs FFA-LoRA (no head)."""
    state = {
        "layer.lora_A.weight": np.zeros((rank, dim), np.float32),
        "layer.lora_B.weight": np.zeros((dim, rank), np.float32),
    }
    # What the strategies record as bytes_down: the ArrayRecord of the rule's global keys.
    sizes = {
        name: to_record({k: v for k, v in state.items() if get_rule(name).traffic.shares(k)}).count_bytes()
        for name in ("fedit", "ffa_lora")
    }
    return {
        "fedit_bytes": sizes["fedit"],
        "ffa_lora_bytes": sizes["ffa_lora"],
        "ratio": sizes["ffa_lora"] / sizes["fedit"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    svd = svd_benchmark(args.dim, args.clients, args.rank, args.repeat)
    print(
        f"one {args.dim}x{args.dim} layer, {args.clients} clients, rank {args.rank} (best of {args.repeat}):"
    )
    print(f"  dense SVD (FlexLoRA)        {svd['dense_seconds']:9.3f} s")
    print(f"  QR-compact SVD (HLoRA)      {svd['compact_seconds']:9.3f} s   ({svd['speedup']:.0f}x faster)")
    print(
        f"  rank-{args.rank} factors differ by max |Δ| {svd['max_abs_error']:.2e}, "
        f"relative {svd['relative_error']:.2e}"
    )
    sizes = bytes_benchmark(args.dim, args.rank)
    print(f"bytes per client per round, rank {args.rank}, {args.dim}x{args.dim}:")
    print(
        f"  FedIT {sizes['fedit_bytes']:,}  FFA-LoRA {sizes['ffa_lora_bytes']:,}  ratio {sizes['ratio']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
