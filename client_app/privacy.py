"""A node's DP-SGD bookkeeping: the plan of its next round and the rounds it has trained."""

from __future__ import annotations

from finetune.config import ExperimentConfig
from finetune.privacy import History, PrivateRound, epsilon, plan_round
from finetune.training import local_step_count
from strategies.client import NodeState

DP_HISTORY = "dp-history"  # node state: (noise multiplier, sample rate, steps) of every DP round


def plan_private_round(cfg: ExperimentConfig, node: NodeState, num_examples: int) -> PrivateRound | None:
    """This round's DP-SGD parameters, or None without DP; refuses once the budget is spent."""
    dp = cfg.privacy
    if not dp.enabled:
        return None
    steps = local_step_count(cfg.train, num_examples)
    plan = plan_round(dp, num_examples, cfg.train.batch_size, steps, cfg.federation.num_rounds)
    if dp.target_epsilon > 0:
        after = epsilon(
            [*dp_history(node), (plan.noise_multiplier, plan.sample_rate, steps)],
            dp.target_delta,
            dp.accountant,
        )
        if after > dp.target_epsilon * (1 + 1e-3):
            raise RuntimeError(
                f"privacy budget exhausted: another round would spend ε={after:.3f} > "
                f"privacy.target_epsilon={dp.target_epsilon} (δ={dp.target_delta})"
            )
    return plan


def dp_history(node: NodeState) -> History:
    record = node.values(DP_HISTORY)
    if record is None:
        return []
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))


def record_private_round(node: NodeState, plan: PrivateRound) -> float:
    """Add this round to the node's DP history and return ε spent so far."""
    history = [*dp_history(node), (plan.noise_multiplier, plan.sample_rate, plan.steps)]
    node.set_values(
        DP_HISTORY,
        {"noise": [h[0] for h in history], "rate": [h[1] for h in history], "steps": [h[2] for h in history]},
    )
    return epsilon(history, plan.delta, plan.accountant)
