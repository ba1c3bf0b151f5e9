"""The experiment schema: every section of an experiment typed, checked once, composed by Hydra
from ``conf/``; the rule configs every aggregation rule extends and registers. Below the ML
library (``finetune``) and the rules (``strategies``): it imports neither."""

from experiment_schema.base import (
    CLUSTER_FIELD,
    CONF_DIR,
    CONFIG_GROUPS,
    SERVER_OPTIMIZERS,
    ConfigError,
    MethodConfig,
    choice,
    clients_per_round,
    higher_is_better,
    method_config_type,
    method_names,
    register_method_config,
    require,
)
from experiment_schema.experiment import (
    ExperimentConfig,
    available_choices,
    compose_config,
    experiment_hash,
    resume_differences,
)
from experiment_schema.reporting import CheckpointConfig, EvaluationConfig, LoggingConfig
from experiment_schema.sections import (
    DatasetConfig,
    FederationConfig,
    ModelConfig,
    PartitionConfig,
    PrivacyConfig,
    TrainConfig,
)

__all__ = [
    "CLUSTER_FIELD",
    "CONFIG_GROUPS",
    "CONF_DIR",
    "SERVER_OPTIMIZERS",
    "CheckpointConfig",
    "ConfigError",
    "DatasetConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LoggingConfig",
    "MethodConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "TrainConfig",
    "available_choices",
    "choice",
    "clients_per_round",
    "compose_config",
    "experiment_hash",
    "higher_is_better",
    "method_config_type",
    "method_names",
    "register_method_config",
    "require",
    "resume_differences",
]
