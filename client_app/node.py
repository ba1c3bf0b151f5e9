"""What a SuperNode's own configuration (``--node-config``) says about its data."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch
from flwr.app import UserConfig

from experiment_schema import ConfigError
from finetune.hub import HUB_MIRROR_ENV, hub_mirror
from strategies.client import NodeFacts

NODE_MEMORY_GB = "memory-gb"  # node config: the memory a rank rule reads (else GPU, else RAM)


def node_partition(node_config: UserConfig, num_clients: int) -> int:
    """This node's partition id; the federation must have as many partitions as clients."""
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has no 'partition-id' (start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>')"
        )
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config.get("num-partitions", num_clients))
    if num_partitions != num_clients:
        raise ConfigError(
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


def node_facts(node_config: UserConfig) -> NodeFacts:
    """What a rule's client half may ask of this node (its rank rule reads the memory)."""
    return NodeFacts(node_config, lambda: node_memory_gb(node_config))


def node_memory_gb(node_config: UserConfig) -> float:
    """Node config ``memory-gb``, else the GPU's memory, else the machine's RAM."""
    if NODE_MEMORY_GB in node_config:
        return float(node_config[NODE_MEMORY_GB])
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return psutil.virtual_memory().total / 2**30
