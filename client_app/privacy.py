"""A node's DP-SGD bookkeeping: its privacy ledger, and the plan of its next round.

The ledger (``<state dir>/privacy-ledger/<data key>.jsonl``, one JSON line per DP round ever
trained on that data, by any run) is the data owner's account: ε is composed over all of it, so
neither a new run nor a resumed one starts again at 0. A round is entered *before* it trains (a
round that then fails still counts: its gradients may have left the node), under a file lock, so
two runs on the same data cannot both spend the last of the budget. Deleting the file is the only
way to reset it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from experiment_schema import ConfigError, ExperimentConfig
from finetune.privacy import History, PrivateRound, epsilon, plan_round
from finetune.training import local_step_count

LEDGER_DIR = "privacy-ledger"


class PrivacyBudgetExhausted(ConfigError):
    """Another round would take the data's ε past ``privacy.target_epsilon``."""


def ledger_key(cfg: ExperimentConfig, partition_id: int, data_path: Path | None) -> str:
    """Names the data a node trains on: its own files, or its partition of a shared dataset
    (dataset, partitioning and seed decide which examples that is)."""
    if data_path is not None:
        resolved = str(data_path.expanduser().resolve())
        return f"data-{data_path.name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"
    what = json.dumps(
        {"dataset": [cfg.dataset.repo_id, cfg.dataset.subset, cfg.dataset.train_split],
         "partition": vars(cfg.partition), "seed": cfg.seed, "max_train": cfg.dataset.max_train_examples},
        sort_keys=True, default=str,
    )  # fmt: skip
    digest = hashlib.sha256(what.encode()).hexdigest()[:12]
    return f"{cfg.dataset.name}-{cfg.partition.name}-{cfg.partition.num_clients}-p{partition_id}-{digest}"


class PrivacyLedger:
    """The DP rounds trained on one node's data, across runs."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / LEDGER_DIR / f"{key}.jsonl"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, entry: dict[str, Any]) -> None:
        """Rewrite the ledger with ``entry`` added (written aside, then renamed over it)."""
        partial = self.path.with_suffix(f".partial-{os.getpid()}")
        text = "".join(json.dumps(e) + "\n" for e in [*self.entries(), entry])
        with open(partial, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)


def history(entries: list[dict[str, Any]]) -> History:
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]


def plan_private_round(
    cfg: ExperimentConfig, ledger: PrivacyLedger, num_examples: int, server_round: int
) -> tuple[PrivateRound, float] | None:
    """This round's DP-SGD parameters and the ε of the data's ledger once it is entered (it is
    entered here, before training); None without DP. Refuses a round past the budget."""
    dp = cfg.privacy
    if not dp.enabled:
        return None
    steps = local_step_count(cfg.train, num_examples)
    with ledger.locked():
        entries = ledger.entries()
        earlier_runs = history([e for e in entries if e.get("experiment") != cfg.experiment_id])
        plan = calibrated_plan(cfg, num_examples, steps, earlier_runs, ledger)
        this_round = (plan.noise_multiplier, plan.sample_rate, steps)
        spent = epsilon([*history(entries), this_round], dp.target_delta, dp.accountant)
        if dp.target_epsilon > 0 and spent > dp.target_epsilon * (1 + 1e-3):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: another round would take this data's ε to {spent:.3f} > "
                f"privacy.target_epsilon={dp.target_epsilon} (δ={dp.target_delta}); the ledger "
                f"{ledger.path} holds {len(entries)} earlier DP round(s)"
            )
        ledger.append(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "experiment": cfg.experiment_id,
             "round": server_round, "noise_multiplier": plan.noise_multiplier,
             "sample_rate": plan.sample_rate, "steps": steps, "delta": dp.target_delta,
             "accountant": dp.accountant, "epsilon_after": spent}
        )  # fmt: skip
    return plan, spent


def calibrated_plan(
    cfg: ExperimentConfig, num_examples: int, steps: int, earlier_runs: History, ledger: PrivacyLedger
) -> PrivateRound:
    """σ as configured; or, calibrating, the σ that ends this run (a client in every round) at the
    target with what earlier runs on this data spent counted in."""
    dp = cfg.privacy
    rounds = cfg.federation.num_rounds
    if dp.target_epsilon <= 0 or not dp.calibrate_noise or not earlier_runs:
        return plan_round(dp, num_examples, cfg.train.batch_size, steps, rounds)
    fixed = plan_round(dp, num_examples, cfg.train.batch_size, steps, rounds)
    q, total = fixed.sample_rate, steps * rounds

    def spent(sigma: float) -> float:
        return epsilon([*earlier_runs, (sigma, q, total)], dp.target_delta, dp.accountant)

    already = epsilon(earlier_runs, dp.target_delta, dp.accountant)
    if already >= dp.target_epsilon:
        raise PrivacyBudgetExhausted(
            f"privacy budget exhausted: earlier runs on this data spent ε={already:.3f} of "
            f"privacy.target_epsilon={dp.target_epsilon} (ledger {ledger.path})"
        )
    low, high = 0.1, 1.0
    while spent(high) > dp.target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyBudgetExhausted(f"no σ below 1e4 fits privacy.target_epsilon after {ledger.path}")
    for _ in range(40):  # bisection: the smallest σ within the budget
        middle = (low + high) / 2
        low, high = (low, middle) if spent(middle) <= dp.target_epsilon else (middle, high)
    return PrivateRound(high, dp.clip_norm, q, steps, dp.target_delta, dp.accountant)
