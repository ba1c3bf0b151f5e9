"""Per-node LoRA ranks, shared by the rules whose clients train at different ranks (FlexLoRA,
HLoRA, HetLoRA, FLoRA): the config that assigns them, the client half that reports its rank when
the server asks and trains at the rank the server then sends it.

A node's rank, first rule that applies:

1. its own ``lora-rank`` node config;
2. ``method.rank_by_memory_gb`` ``[[min GB, rank], ...]``: the largest rank whose threshold the
   node's memory reaches (node config ``memory-gb``, else its GPU's memory, else its RAM);
3. ``method.client_ranks`` with ``method.client_rank_probs``: a rank drawn per partition id (seeded);
4. ``method.client_ranks`` alone: ``client_ranks[p % len(client_ranks)]``; ``[]`` = ``rank`` for all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiment_schema import ExperimentConfig, MethodConfig, require
from finetune.spec import AdapterSpec
from strategies.client import ClientRule, NodeFacts, NodeState

NODE_RANK = "lora-rank"  # node config: the operator's choice of rank


@dataclass
class HeterogeneousRankConfig(MethodConfig):
    """How nodes get their ranks (see the module), and the rank of the server's global factors."""

    client_ranks: list[int] = field(default_factory=list)
    client_rank_probs: list[float] = field(default_factory=list)
    rank_by_memory_gb: list[list[int]] = field(default_factory=list)
    # Rank of the server's global factors; 0 = the rule's default (see the rule).
    global_rank: int = 0

    uploads_are_global = False
    no_server_optimizer = (
        "its global state is factors redistributed per node rank, not arrays the clients move"
    )
    no_robust_aggregate = (
        "clients upload factors of different ranks whose products are combined and re-factored; a "
        "coordinate-wise aggregate of the factors is not one of the updates"
    )

    def validate(self) -> None:
        super().validate()
        require(
            all(r >= 1 for r in self.client_ranks), f"method.client_ranks must be >= 1: {self.client_ranks}"
        )
        if self.client_rank_probs:
            probs = self.client_rank_probs
            require(
                len(probs) == len(self.client_ranks)
                and all(p >= 0 for p in probs)
                and abs(sum(probs) - 1) < 1e-6,
                f"method.client_rank_probs {probs} must be {len(self.client_ranks)} non-negative numbers "
                f"summing to 1, one per method.client_ranks entry",
            )
        rule = self.rank_by_memory_gb
        require(
            all(len(step) == 2 and step[1] >= 1 and step[1] == int(step[1]) for step in rule)
            and [step[0] for step in rule] == sorted({step[0] for step in rule}),
            f"method.rank_by_memory_gb {rule} must be [[min GB, rank], ...] with rising thresholds",
        )
        require(self.global_rank >= 0, f"method.global_rank must be >= 0, got {self.global_rank}")

    def client_rank(self, partition_id: int, seed: int) -> int:
        """The rank the config gives the client of ``partition_id`` (no node settings)."""
        ranks = self.client_ranks
        if not ranks:
            return self.rank
        if self.client_rank_probs:
            rng = np.random.default_rng([seed, partition_id])
            return int(rng.choice(ranks, p=self.client_rank_probs))
        return ranks[partition_id % len(ranks)]

    def memory_rank(self, memory_gb: float) -> int | None:
        """The rank ``rank_by_memory_gb`` gives a node with ``memory_gb``, None without a rule."""
        rule = self.rank_by_memory_gb
        if not rule:
            return None
        fitting = [int(rank) for threshold, rank in rule if memory_gb >= threshold]
        return fitting[-1] if fitting else int(rule[0][1])

    def max_client_rank(self, partition_id: int, seed: int) -> int:
        """The largest rank the client of ``partition_id`` can train at under the config."""
        if self.rank_by_memory_gb:
            return max(int(rank) for _, rank in self.rank_by_memory_gb)
        return self.client_rank(partition_id, seed)

    def client_rank_bounds(self, num_clients: int, seed: int) -> list[int]:
        """The largest rank each client can have."""
        return [self.max_client_rank(p, seed) for p in range(num_clients)]


def configured_rank(method: HeterogeneousRankConfig, seed: int, partition_id: int, facts: NodeFacts) -> int:
    """A node's rank by the rules of this module."""
    if NODE_RANK in facts.node_config:
        rank = int(facts.node_config[NODE_RANK])
        if rank < 1:
            raise ValueError(f"node config {NODE_RANK} must be >= 1, got {rank}")
        return rank
    by_memory = method.memory_rank(facts.memory_gb()) if method.rank_by_memory_gb else None
    return by_memory if by_memory is not None else method.client_rank(partition_id, seed)


class RankedClient(ClientRule):
    """A client that tells the server its rank and trains at the rank the server sends."""

    @classmethod
    def describe(
        cls, cfg: ExperimentConfig, partition_id: int, node: NodeState, facts: NodeFacts
    ) -> int | None:
        assert isinstance(cfg.method, HeterogeneousRankConfig)
        return configured_rank(cfg.method, cfg.seed, partition_id, facts)

    @property
    def rank(self) -> int:
        """This round's rank, as the server decided it (it may lag a node's own pruning)."""
        rank = self.job.instruction.rank
        if rank is None:
            raise ValueError(f"{self.cfg.method.name}: the server sent no LoRA rank")
        return rank

    def adapter(self) -> AdapterSpec:
        return self.default_adapter(self.cfg, self.rank)
