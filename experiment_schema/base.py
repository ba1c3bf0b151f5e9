"""The schema's foundations: the closed choices, the errors a bad config raises, and the rule
config every aggregation rule extends, with the registry rules add theirs to.

Rules register their configs when their package is imported; :func:`ensure_rules` imports the
packages named in :data:`RULE_PACKAGES` (by name: the schema sits below the rules and imports none
of them), so nothing has to import the rules first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from experiment_schema.experiment import ExperimentConfig

#: Packages that register rules (their configs) when imported.
RULE_PACKAGES = ("strategies",)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_GROUPS = ("method", "model", "dataset", "partition")

METRIC_NAMES = ("accuracy", "f1", "matthews", "exact_match", "loss")
LOWER_IS_BETTER = frozenset({"loss"})
TASKS = ("text_classification", "image_classification", "causal_lm")
MODEL_BUILDERS = ("auto", "efficientnet_lite0")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
# Fixed per-client image transformations for a feature-shift split (finetune/tasks/image.py).
CLUSTER_FIELD = "cluster"  # the derived field of partition.clusters
FEATURE_SHIFTS = ("none", "grayscale", "invert", "hflip", "vflip", "rotate90", "blur", "solarize", "contrast")
LR_SCHEDULES = ("constant", "cosine", "linear")
WEIGHTINGS = ("examples", "uniform")
WIRE_DTYPES = ("float32", "float16")
SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi", "adagrad")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``federation.update_bound`` and ``federation.robust`` (strategies/bounds.py, strategies/robust.py).
UPDATE_BOUNDS = ("off", "reject", "clip")
ROBUST_AGGREGATES = ("none", "median", "trimmed_mean", "krum", "multi_krum")


class ConfigError(ValueError):
    """An experiment configuration that cannot run; the message names the problem."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def clients_per_round(num_nodes: int, fraction: float, minimum: int) -> int:
    """How many of ``num_nodes`` connected nodes a round samples."""
    return min(num_nodes, max(int(num_nodes * fraction), minimum))


def choice(value: str, choices: tuple[str, ...], what: str) -> None:
    require(value in choices, f"{what}={value!r} is not valid; choose one of {list(choices)}")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is the better one (accuracy yes, loss no)."""
    return metric not in LOWER_IS_BETTER


@dataclass
class MethodConfig:
    """What every rule's config holds: the adapter it trains, how clients are weighted and how
    arrays travel. A rule subclasses it with its own options (``strategies/<rule>.py``) and
    registers the subclass (:func:`register_method_config`); its YAML names the schema."""

    name: str = "fedit"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    weighting: str = "examples"  # examples | uniform
    wire_dtype: str = "float32"  # dtype of arrays on the wire
    # The method's own peak learning rate (full fine-tuning wants far less than LoRA); 0 = train.lr.
    lr: float = 0.0
    # A server-side optimizer on the pseudo-gradient (aggregate − previous global), Reddi et al.
    # 2021: none | avgm | adam | yogi | adagrad (strategies/server_optim.py).
    server_optimizer: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.0  # avgm
    server_beta1: float = 0.9  # adam, yogi, adagrad
    server_beta2: float = 0.99  # adam, yogi
    server_tau: float = 1e-3  # adam, yogi, adagrad

    #: A client's upload holds the global arrays themselves, so an update is upload − global
    #: (Flower's server-side clipping needs this); False where uploads differ in shape or meaning.
    uploads_are_global: ClassVar[bool] = True
    #: Why a server optimizer cannot apply to this rule ("" = it can).
    no_server_optimizer: ClassVar[str] = ""
    #: Why ``federation.robust`` cannot apply to this rule ("" = its aggregate is a weighted mean
    #: of the uploads, which a robust aggregate can replace); checked against the rule at registration.
    no_robust_aggregate: ClassVar[str] = ""

    def validate(self) -> None:
        choice(self.name, tuple(method_names()), "method.name")
        require(self.rank >= 1, f"method.rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"method.alpha must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"method.dropout must be in [0, 1), got {self.dropout}")
        choice(self.weighting, WEIGHTINGS, "method.weighting")
        choice(self.wire_dtype, WIRE_DTYPES, "method.wire_dtype")
        require(self.lr >= 0, f"method.lr must be >= 0 (0 = train.lr), got {self.lr}")
        choice(self.server_optimizer, SERVER_OPTIMIZERS, "method.server_optimizer")
        if self.server_optimizer != "none":
            require(
                not self.no_server_optimizer,
                f"method.server_optimizer={self.server_optimizer} does not apply to {self.name}: "
                f"{self.no_server_optimizer}",
            )
            require(self.server_lr > 0, f"method.server_lr must be > 0, got {self.server_lr}")
            require(0 <= self.server_momentum < 1, "method.server_momentum must be in [0, 1)")
            require(0 <= self.server_beta1 < 1, "method.server_beta1 must be in [0, 1)")
            require(0 <= self.server_beta2 < 1, "method.server_beta2 must be in [0, 1)")
            require(self.server_tau > 0, f"method.server_tau must be > 0, got {self.server_tau}")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        """Checks that need the rest of the experiment (a rule overrides it to add its own)."""


_METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def ensure_rules() -> None:
    """Import the rule packages once, so every rule's config is registered."""
    if not _METHOD_CONFIGS:
        import importlib

        for package in RULE_PACKAGES:
            importlib.import_module(package)


def registered_method_configs() -> dict[str, type[MethodConfig]]:
    ensure_rules()
    return dict(_METHOD_CONFIGS)


def register_method_config(name: str, config: type[MethodConfig]) -> None:
    """Make ``config`` the schema of ``method.name == name`` (rules call this when imported)."""
    if _METHOD_CONFIGS.get(name, config) is not config:
        raise ValueError(f"method {name!r} is registered twice")
    _METHOD_CONFIGS[name] = config


def method_names() -> list[str]:
    return sorted(registered_method_configs())


def method_config_type(name: str) -> type[MethodConfig]:
    """The registered config class of method ``name``."""
    configs = registered_method_configs()
    if name not in configs:
        raise ConfigError(f"unknown method {name!r}; valid choices: {sorted(configs)}")
    return configs[name]
