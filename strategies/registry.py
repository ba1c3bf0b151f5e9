"""The rule registry: each rule module registers one :class:`Rule` — its config schema, its server
Strategy and its client half — and everything else (ServerApp, ClientApp, benchmarks, tests) looks
rules up here instead of naming them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from experiment_schema import ExperimentConfig, MethodConfig, register_method_config
from finetune.spec import AdapterSpec
from strategies.bounds import UpdateBound
from strategies.client import ClientRound, ClientRule
from strategies.engine import Engine
from strategies.nodes import NodeDirectory
from strategies.robust import RobustAggregate
from strategies.rule import ServerRule
from strategies.traffic import Traffic


class Family(StrEnum):
    """How a rule relates to the others: what a benchmark compares it with."""

    BASELINE = "baseline"  # no federation (the centralized upper bound)
    LORA = "lora"  # one shared LoRA adapter at one rank
    HETEROGENEOUS_RANK = "heterogeneous-rank"  # every node at its own LoRA rank
    MERGED_BASE = "merged-base"  # each round's update folded into the frozen base
    FULL = "full"  # full fine-tuning (direct weight averaging)


@dataclass(frozen=True)
class Rule:
    """One aggregation rule: both halves and what is known about it."""

    name: str
    family: Family
    source: str  # the paper
    config: type[MethodConfig]
    strategy: type[ServerRule]
    client: type[ClientRule]
    centralized: bool = False  # no federation: the server trains on the union of the data

    @property
    def personalised(self) -> bool:
        """Part of every model stays on its client: scored on the clients' own validation shares."""
        return self.strategy.evaluate_on_clients

    @property
    def heterogeneous_ranks(self) -> bool:
        return self.strategy.heterogeneous_ranks

    @property
    def lora_family(self) -> bool:
        """A LoRA rule scored on the common evaluation set (the benchmark's "LoRA family")."""
        lora = (Family.LORA, Family.HETEROGENEOUS_RANK, Family.MERGED_BASE)
        return self.family in lora and not self.personalised

    @property
    def traffic(self) -> Traffic:
        """What travels each round: declared once, on the server half, read by both."""
        return self.strategy.traffic

    def build_strategy(self, cfg: ExperimentConfig) -> Engine:
        """The Flower Strategy that runs this rule: the engine around its server half."""
        return build_engine(cfg, self.strategy)

    def build_client(self, job: ClientRound) -> ClientRule:
        """The client half for one message, with the rule's traffic."""
        return self.client(job, self.traffic)

    def server_adapter(self, cfg: ExperimentConfig) -> AdapterSpec:
        """The adapter of the server's model (the one it evaluates and saves)."""
        return self.strategy.global_adapter(cfg, self.client.default_adapter(cfg))


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule``; its config becomes the schema of ``method.name == rule.name``."""
    if rule.name in RULES:
        raise ValueError(f"rule {rule.name!r} is registered twice")
    if rule.strategy.name != rule.name:
        raise ValueError(f"rule {rule.name!r}: its strategy is named {rule.strategy.name!r}")
    if rule.strategy.streamable == bool(rule.config.no_robust_aggregate):
        raise ValueError(
            f"rule {rule.name!r}: streamable={rule.strategy.streamable} (a weighted-mean aggregate) but "
            f"no_robust_aggregate={rule.config.no_robust_aggregate!r}; a robust aggregate applies "
            "exactly to the weighted-mean rules, so exactly the others give a reason"
        )
    register_method_config(rule.name, rule.config)
    RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise KeyError(f"unknown rule {name!r}; registered: {sorted(RULES)}")
    return RULES[name]


def build_engine(cfg: ExperimentConfig, rule_type: type[ServerRule]) -> Engine:
    """The engine of ``cfg``: the rule with its own config (resolved) and the federation."""
    f = cfg.federation
    nodes = NodeDirectory(
        ranked=rule_type.heterogeneous_ranks, fraction_train=f.fraction_train,
        min_train_nodes=f.min_train_clients, seed=cfg.seed, connect_timeout_s=f.connect_timeout_s,
        query_all_up_to=f.query_all_up_to,
    )  # fmt: skip
    rule = rule_type(rule_type.resolve(cfg), nodes)
    return Engine(
        rule,
        min_replies=f.min_replies,
        evaluate_on_clients=rule.evaluate_on_clients or cfg.evaluation.where == "clients",
        bound=UpdateBound(f.update_bound, f.update_bound_k, f.update_bound_norm),
        robust=RobustAggregate(f.robust, f.robust_trim, f.robust_byzantine, f.robust_keep),
    )
