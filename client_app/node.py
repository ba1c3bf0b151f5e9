"""What a SuperNode's own configuration (``--node-config``) says about its data."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch
from flwr.app import UserConfig

from finetune.config import ExperimentConfig
from finetune.hub import HUB_MIRROR_ENV, hub_mirror


def node_partition(node_config: UserConfig, num_clients: int) -> int:
    """This node's partition id; the federation must have as many partitions as clients."""
    if "partition-id" not in node_config:
        raise ValueError(
            "node config has no 'partition-id' (start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>')"
        )
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config.get("num-partitions", num_clients))
    if num_partitions != num_clients:
        raise ValueError(
            f"the federation has {num_partitions} partitions (num-supernodes / num-partitions) "
            f"but the experiment expects partition.num_clients={num_clients}"
        )
    return partition_id


def node_data_path(node_config: UserConfig) -> Path | None:
    """A data owner's own training data (node config ``data-path``), used instead of its
    partition of the shared dataset; ``partition-id`` then only identifies the client."""
    path = str(node_config.get("data-path", ""))
    return Path(path).expanduser() if path else None


def node_hub_mirror(node_config: UserConfig, experiment_mirror: str) -> Path | None:
    """The node's own mirror (node config ``hub-mirror``, then its $FEDSUBSPACE_HUB_MIRROR)
    wins over the experiment's setting, which names a folder on the server's machine."""
    own = str(node_config.get("hub-mirror", "")) or os.environ.get(HUB_MIRROR_ENV, "")
    return hub_mirror(own or experiment_mirror)


def node_rank(node_config: UserConfig, cfg: ExperimentConfig, partition_id: int) -> int:
    """This node's LoRA rank: its own ``lora-rank`` node config, else the memory rule, else the
    experiment's per-partition ranks."""
    if "lora-rank" in node_config:
        rank = int(node_config["lora-rank"])
        if rank < 1:
            raise ValueError(f"node config lora-rank must be >= 1, got {rank}")
        return rank
    by_memory = cfg.memory_rank(node_memory_gb(node_config)) if cfg.method.rank_by_memory_gb else None
    return by_memory if by_memory is not None else cfg.client_rank(partition_id)


def node_memory_gb(node_config: UserConfig) -> float:
    """Node config ``memory-gb``, else the GPU's memory, else the machine's RAM."""
    if "memory-gb" in node_config:
        return float(node_config["memory-gb"])
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return psutil.virtual_memory().total / 2**30
