"""The one typed experiment schema, composed by Hydra from ``conf/`` and validated once.

The ServerApp composes an :class:`ExperimentConfig` from config-group selections plus Hydra
overrides, validates it, and ships it to clients as JSON inside each message, so server and
clients can never disagree about the experiment.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiment_schema.base import (
    CLUSTER_FIELD,
    CONF_DIR,
    CONFIG_GROUPS,
    ConfigError,
    MethodConfig,
    choice,
    ensure_rules,
    method_config_type,
    registered_method_configs,
    require,
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


@dataclass
class ExperimentConfig:
    """Everything one federated fine-tuning run needs."""

    name: str = ""
    seed: int = 0
    # A leaderboard whose rules the run must keep (set by its recipe): "" | flowertune (exactly 20
    # nodes and a communication budget of at most 200,000 MB).
    leaderboard: str = ""
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub_mirror: str = ""  # local Hub mirror root; "" = $FEDSUBSPACE_HUB_MIRROR, then the Hub
    output_dir: str = ""  # absolute folder that receives runs/<date-time>-<name>/
    # Where nodes keep state that outlives a run (rule state of resumable runs, privacy ledgers)
    # when their own node config names no `state-dir`: "" = $FEDSUBSPACE_STATE_DIR, then
    # ~/.cache/fedsubspace/node-state. For simulations; a real node's operator decides its own.
    node_state_dir: str = ""
    # Set by the ServerApp: the run folder's name and the experiment's hash, which names what the
    # nodes keep for this experiment on their disks (the same when a run is resumed).
    experiment_id: str = ""
    save_adapter: bool = True

    def check_leaderboard(self) -> None:
        """The leaderboard's rules (FlowerTune: 20 SuperNodes, a 200,000 MB budget)."""
        choice(self.leaderboard, ("", "flowertune"), "leaderboard")
        if self.leaderboard == "flowertune":
            budget = self.federation.max_communication_mb
            require(
                self.partition.num_clients == 20,
                f"leaderboard=flowertune: the leaderboard's runs have exactly 20 SuperNodes; "
                f"partition.num_clients={self.partition.num_clients}",
            )
            require(
                0 < budget <= FLOWERTUNE_BUDGET_MB,
                f"leaderboard=flowertune: the communication budget is {FLOWERTUNE_BUDGET_MB:,} MB; "
                f"federation.max_communication_mb={budget:g} (0 = none) exceeds it",
            )

    def evaluation_due(self, server_round: int) -> bool:
        """Whether the global model is scored after ``server_round`` (0: the initial model)."""
        last = self.federation.num_rounds
        return server_round in (0, last) or server_round % self.evaluation.every == 0

    def validate(self) -> ExperimentConfig:
        self.method.validate()
        self.model.validate()
        self.dataset.validate()
        self.partition.validate()
        self.train.validate()
        self.federation.validate(self.partition.num_clients)
        self.privacy.validate()
        self.logging.validate()
        self.evaluation.validate()
        self.checkpoint.validate()
        if self.privacy.enabled and self.privacy.mode == "central":
            require(
                self.method.uploads_are_global,
                f"privacy.mode=central clips each upload against the global arrays; {self.method.name}'s "
                "uploads differ from them (use privacy.mode=local)",
            )
            require(
                self.method.weighting == "uniform",
                "privacy.mode=central bounds each client's influence on a uniform mean: "
                "set method.weighting=uniform",
            )
        self.check_leaderboard()
        require(
            not self.evaluation.lm_eval.tasks or self.dataset.task == "causal_lm",
            f"evaluation.lm_eval scores causal LMs; dataset {self.dataset.name!r} is {self.dataset.task}",
        )
        if self.federation.robust != "none":
            require(
                not self.method.no_robust_aggregate,
                f"federation.robust={self.federation.robust} does not apply to {self.method.name}: "
                f"{self.method.no_robust_aggregate}",
            )
            require(
                not (self.privacy.enabled and self.privacy.mode == "central"),
                "federation.robust: privacy.mode=central calibrates its noise to a uniform mean's "
                "sensitivity; a robust aggregate has another (use privacy.mode=local)",
            )
        if self.privacy.enabled:
            require(
                self.train.precision in ("auto", "fp32"),
                "privacy.enabled: DP-SGD trains in fp32 (Opacus's per-sample clipping is not checked "
                f"under autocast here); train.precision={self.train.precision} is refused: set "
                "train.precision=fp32",
            )
            require(
                self.train.grad_accum_steps == 1,
                "privacy.enabled: DP-SGD's Poisson batches define the batch; train.grad_accum_steps "
                "must be 1",
            )
        self.method.check_experiment(self)
        part, data = self.partition, self.dataset
        require(
            part.name == "iid" or self.partition_field is not None,
            f"partition.name={part.name!r} splits by a field, and {data.name!r} has no labels: "
            "set partition.by=<field> or partition.clusters=<k> (or partition.name=iid)",
        )
        require(
            not part.feature_shift or data.task == "image_classification",
            f"partition.feature_shift transforms images; {data.name!r} is {data.task}",
        )
        require(
            self.model.builder == "auto" or data.task == "image_classification",
            f"model.builder={self.model.builder!r} is an image classifier; {data.name!r} is {data.task}",
        )
        if part.name == "pathological" and self.partition_field == data.label_field:
            require(
                self.partition.classes_per_client <= self.dataset.num_labels,
                f"partition.classes_per_client={self.partition.classes_per_client} exceeds "
                f"dataset.num_labels={self.dataset.num_labels}",
            )
        if self.dataset.max_train_examples is not None:
            require(
                self.dataset.max_train_examples >= self.partition.num_clients,
                f"dataset.max_train_examples={self.dataset.max_train_examples} is fewer than "
                f"partition.num_clients={self.partition.num_clients}: some clients would get no data",
            )
        return self

    @property
    def partition_field(self) -> str | None:
        """The field the partitioner splits by: ``cluster`` (derived), ``partition.by``, or the
        label field of a classification task; None for unlabelled data without either."""
        if self.partition.clusters:
            return CLUSTER_FIELD
        if self.partition.by:
            return self.partition.by
        return self.dataset.label_field if self.dataset.is_classification else None

    @property
    def peak_lr(self) -> float:
        """``method.lr`` where the method sets one, else ``train.lr``."""
        return self.method.lr or self.train.lr

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method.name}-{self.dataset.name}-{self.model.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build and validate from a plain dict (unknown keys and wrong types are errors); the
        ``method`` part is checked against the schema its ``name`` registered."""
        data = migrated(data)
        method = data.get("method") or {}
        name = method.get("name", MethodConfig.name) if isinstance(method, dict) else MethodConfig.name
        try:
            merged = OmegaConf.merge(structured_schema(cls, method_config_type(str(name))), data)
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as error:
            raise ConfigError(f"invalid experiment config: {error}") from error
        assert isinstance(config, cls)
        return config.validate()

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_dict(json.loads(text))


@functools.cache
def structured_schema(experiment: type[ExperimentConfig], method: type[MethodConfig]) -> Any:
    """The experiment's OmegaConf schema with ``method``'s config (``OmegaConf.merge`` copies it)."""
    return OmegaConf.structured(experiment(method=method()))


FLOWERTUNE_BUDGET_MB = 200_000


def migrated(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config of an older version in today's schema: ``model.random_init`` became
    ``model.weights``."""
    model = data.get("model")
    if isinstance(model, dict) and "random_init" in model:
        model = {k: v for k, v in model.items() if k != "random_init"}
        model.setdefault("weights", "random" if data["model"]["random_init"] else "pretrained")
        data = {**data, "model": model}
    return data


#: What a resumed run may change from its checkpoint: its length, its patience, where files are
#: and what it reports. Anything else would make the resumed run a different experiment.
RESUMABLE_CHANGES = (
    "federation.num_rounds", "federation.round_timeout_s", "federation.connect_timeout_s",
    "logging.", "checkpoint.", "hub_mirror", "output_dir", "node_state_dir", "experiment_id",
    "train.num_threads",
)  # fmt: skip


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resumable(key: str) -> bool:
    """Whether a resumed run may change the setting ``key`` (dotted)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def resume_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: saved -> new`` for every setting that differs and a resume may not change."""
    old, current = flatten(saved), flatten(new)
    return [
        f"{key}: {old.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}"
        for key in sorted(set(old) | set(current))
        if old.get(key) != current.get(key) and not resumable(key)
    ]


def experiment_hash(cfg: ExperimentConfig) -> str:
    """A digest of the settings that define the experiment (all but :data:`RESUMABLE_CHANGES`)."""
    import hashlib

    kept = {k: v for k, v in flatten(cfg.to_dict()).items() if not resumable(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


SCHEMA_NAME = "experiment_schema"


def method_schema_name(name: str) -> str:
    """The Hydra schema a method YAML lists first in its defaults (``- _schema_<name>``)."""
    return f"_schema_{name}"


def register_schema() -> None:
    """Make :class:`ExperimentConfig` the schema under ``conf/config.yaml`` (its first default) and
    each registered method config the schema of its YAML: every key is type-checked while Hydra
    composes, any key can be overridden, and a group file only lists what differs."""
    from hydra.core.config_store import ConfigStore

    configs = registered_method_configs()
    if configs == _STORED_SCHEMAS:  # storing converts every dataclass again: a tenth of a second
        return
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=ExperimentConfig)
    for name, config in configs.items():
        store.store(group="method", name=method_schema_name(name), node=config)
    _STORED_SCHEMAS.clear()
    _STORED_SCHEMAS.update(configs)


_STORED_SCHEMAS: dict[str, type[MethodConfig]] = {}  # what register_schema last stored


def explain_override_error(message: str, overrides: list[str]) -> str:
    """Hydra's composition error, with the valid keys where a key was unknown (Hydra itself
    suggests ``+key=...``, which the schema would refuse anyway)."""
    unknown = re.search(r"Could not override '([\w.]+)'", message)
    if unknown is None:
        return f"cannot compose config with overrides {overrides}: {message}"
    key = unknown.group(1)
    parent, _, leaf = key.rpartition(".")
    schema: Any = OmegaConf.structured(ExperimentConfig)
    for part in parent.split(".") if parent else []:
        schema = schema.get(part) if hasattr(schema, "get") else None
    if parent == "method":
        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
        name = chosen[-1] if chosen else MethodConfig.name
        schema = {
            f.name: None for f in dataclasses.fields(registered_method_configs().get(name, MethodConfig))
        }
        parent = f"method {name}"
    keys = sorted(schema.keys()) if hasattr(schema, "keys") else []
    close = [k for k in keys if leaf[:3] in k] or keys
    return (
        f"unknown key {key!r}; {parent or 'the experiment'} has {close if len(close) < len(keys) else keys}"
    )


def available_choices(group: str) -> list[str]:
    """The option names of a config group (the YAML files in ``conf/<group>/``)."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def compose_config(
    selections: dict[str, str] | None = None,
    overrides: str | list[str] = "",
    conf_dir: Path = CONF_DIR,
) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with group selections and Hydra overrides, then validate.

    ``selections`` maps a config group (method, model, dataset, partition) to an option name;
    ``overrides`` is a list of Hydra overrides or one space-separated string of them.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    ensure_rules()
    selections = dict(selections or {})
    for group, option in selections.items():
        choice(group, CONFIG_GROUPS, "config group")
        choices = available_choices(group)
        require(option in choices, f"unknown {group} {option!r}; valid choices: {choices}")
    override_list = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    hydra_overrides = [f"{group}={option}" for group, option in selections.items()]
    hydra_overrides += override_list

    register_schema()
    key = (
        str(conf_dir),
        tuple(hydra_overrides),
        conf_files_state(Path(conf_dir)),
        tuple(_STORED_SCHEMAS.items()),
    )
    if key not in _COMPOSED:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
                composed = compose(config_name="config", overrides=hydra_overrides)
        except HydraException as error:
            raise ConfigError(explain_override_error(str(error), hydra_overrides)) from error
        finally:
            GlobalHydra.instance().clear()
        data = OmegaConf.to_container(composed, resolve=True)
        assert isinstance(data, dict)
        _COMPOSED[key] = {str(k): v for k, v in data.items()}
    return ExperimentConfig.from_dict(copy.deepcopy(_COMPOSED[key]))


#: Hydra's compositions by everything they depend on (a quarter of a second each; tests, sweeps
#: and the CLI compose the same experiment many times in a process). Validation still runs on each.
_COMPOSED: dict[tuple[object, ...], dict[str, Any]] = {}


def conf_files_state(conf_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Each YAML file under ``conf_dir`` with its modification time and size."""
    files = sorted(conf_dir.rglob("*.yaml"))
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
