"""Who the clients are: the connected nodes, what each told about itself (partition id, LoRA rank),
the seeded sample of a round, and the order every sum runs in.

Node ids are drawn anew whenever a SuperNode (or a simulation) starts; partition ids are what the
data owners configured, so sampling and summation follow them and a seed means the same clients in
every run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from experiment_schema import clients_per_round
from strategies import protocol
from strategies.protocol import CONFIG, METRICS
from strategies.replies import fail_on_common_config_error

log = logging.getLogger(__name__)


class NodeDirectory:
    """The nodes of a federation as the server knows them: partition ids and, where every node
    trains at its own rank, LoRA ranks (a rule may change one: HetLoRA's pruning)."""

    def __init__(
        self,
        *,
        ranked: bool = False,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        seed: int = 0,
        connect_timeout_s: float = 300.0,
        query_timeout_s: float = 120.0,
        query_all_up_to: int = 100,
    ) -> None:
        self.ranked = ranked  # whether nodes must report a LoRA rank
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.seed = seed
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.query_all_up_to = query_all_up_to
        self.partitions: dict[int, int] = {}
        self.ranks: dict[int, int] = {}
        self.restored_ranks: dict[int, int] = {}  # partition -> rank, from a checkpoint
        self.registration_rank: dict[int, int] = {}  # where a node's partition is not known yet

    def rank(self, node_id: int) -> int:
        rank = self.ranks.get(node_id)
        if rank is None:
            raise RuntimeError(f"node {node_id} did not report its LoRA rank")
        return rank

    # --- checkpoints: facts about nodes are keyed by partition id, which outlives node ids ---
    def checkpoint_state(self) -> dict[str, Any]:
        if not self.ranked:
            return {}
        known = {n: r for n, r in self.ranks.items() if n in self.partitions}
        ranks = {**self.restored_ranks, **{self.partitions[n]: r for n, r in known.items()}}
        return {"partition_ranks": {str(p): r for p, r in sorted(ranks.items())}}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.restored_ranks = {int(p): int(r) for p, r in state.get("partition_ranks", {}).items()}

    # --- sampling ------------------------------------------------------------------------
    def connected(self, grid: Grid) -> list[int]:
        """The nodes connected now; waits (bounded) for ``min_train_nodes`` of them."""
        deadline = time.monotonic() + self.connect_timeout_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.min_train_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no client node connected within {self.connect_timeout_s:.0f} s")
        return nodes

    def sample(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """This round's seeded sample of the connected nodes, in client order."""
        if len(nodes) < self.min_train_nodes:
            log.warning(
                "round %d: only %d node(s) connected (min_train_nodes=%d); training with them",
                server_round,
                len(nodes),
                self.min_train_nodes,
            )
        ordered = sorted(nodes, key=self.client_order)
        count = clients_per_round(len(ordered), self.fraction_train, self.min_train_nodes)
        # Sample positions, not ids: node ids are unsigned 64-bit and would not survive numpy.
        rng = np.random.default_rng([self.seed, server_round])
        return [ordered[i] for i in sorted(rng.choice(len(ordered), size=count, replace=False))]

    def sample_learnt(
        self, grid: Grid, nodes: Sequence[int], config: ConfigRecord, server_round: int
    ) -> list[int]:
        """This round's sample, every sampled node described (partition, rank): a small federation
        is asked whole first; a large one only in the nodes the round samples."""
        unknown = [n for n in nodes if not self.described(n)]
        if len(unknown) <= self.query_all_up_to:
            self.learn(grid, nodes, config)
            return self.sample(nodes, server_round)
        self.learn_registration_order(grid, unknown)
        sampled = self.sample(nodes, server_round)
        self.learn(grid, sampled, config)
        return sampled

    def described(self, node_id: int) -> bool:
        """Whether the node told its partition id (and its rank, where ranks differ)."""
        return node_id in self.partitions and (not self.ranked or node_id in self.ranks)

    def client_order(self, node_id: int) -> tuple[int, int, int]:
        """Sort key of a node: its partition id (stable across runs) — or, not asked yet, its rank
        in registration order, which is its partition id in a simulation — then its node id."""
        partition = self.partitions.get(node_id, self.registration_rank.get(node_id))
        return (0, partition, node_id) if partition is not None else (1, 0, node_id)

    def learn_registration_order(self, grid: Grid, unknown: Sequence[int]) -> None:
        """Rank the nodes not described yet by when they registered with the SuperLink."""
        order = {info.node_id: (info.registered_at, info.node_id) for info in grid.get_nodes()} if hasattr(
            grid, "get_nodes"
        ) else {}  # fmt: skip
        ranked = sorted(unknown, key=lambda n: order.get(n, ("", n)))
        self.registration_rank.update({n: rank for rank, n in enumerate(ranked)})

    def learn(self, grid: Grid, nodes: Sequence[int], config: ConfigRecord) -> None:
        """Ask each node not described yet for its partition id and LoRA rank (a QUERY message)."""
        unknown = [n for n in nodes if not self.described(n)]
        if not unknown:
            return
        messages = [
            Message(
                RecordDict({CONFIG: ConfigRecord(dict(config))}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in unknown
        ]
        refusals: dict[int, str] = {}
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout_s):
            node_id = reply.metadata.src_node_id
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS)
            described = None if metrics is None else protocol.NodeDescription.from_metrics(metrics)
            if described is not None:
                self.partitions.setdefault(node_id, described.partition_id)
                if described.rank is not None and self.ranked:
                    self.ranks.setdefault(node_id, described.rank)  # keeps HetLoRA pruning
                    restored = self.restored_ranks.get(self.partitions[node_id])
                    if restored is not None:  # a resumed run: the rank the checkpoint held
                        self.ranks[node_id] = restored
            if not self.described(node_id):
                reason = str(reply.error.reason) if reply.has_error() else "no partition id or LoRA rank"
                refusals[node_id] = reason
                log.warning("node %d did not describe itself: %s", node_id, reason)
        fail_on_common_config_error(refusals, unknown, "describe itself")
        self._warn_shared_partitions(nodes, unknown)
        log.info("partition per new node: %s", {n: self.partitions.get(n) for n in unknown})
        if self.ranked:
            log.info("LoRA rank per new node: %s", {n: self.ranks.get(n) for n in unknown})

    def _warn_shared_partitions(self, nodes: Sequence[int], unknown: Sequence[int]) -> None:
        holders: dict[int, list[int]] = {}
        for node_id in nodes:
            if node_id in self.partitions:
                holders.setdefault(self.partitions[node_id], []).append(node_id)
        for partition, same in holders.items():
            if len(same) > 1 and not set(same).isdisjoint(unknown):
                log.warning("nodes %s all hold partition %d: check their --node-config", same, partition)
