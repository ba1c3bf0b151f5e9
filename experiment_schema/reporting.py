"""The sections of an experiment that say how a run is judged and kept: evaluation (our metrics
and lm-evaluation-harness tasks), logging and trackers, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from experiment_schema.base import choice, require


@dataclass
class LmEvalConfig:
    """EleutherAI's lm-evaluation-harness on the global causal LM (finetune/harness.py): its task
    names (or names of tasks defined in the ``include`` folder, in the harness's YAML format),
    scored after the last round, and before round 1 and every ``every`` rounds when ``every`` > 0,
    where ``evaluation.where`` says; the scores are ``eval_lm_<task>_<metric>``."""

    tasks: list[str] = field(default_factory=list)
    include: str = ""  # a folder of task YAMLs (local tasks, their data files beside them)
    num_fewshot: int = -1  # -1: each task's own default
    limit: int = 0  # examples scored per task; 0 = all
    batch_size: int = 8
    every: int = 0
    # A leaderboard's domain score: eval_lm_<average> = the mean of the tasks' main scores (acc,
    # exact match or pass@1); "" = none.
    average: str = ""
    # Tasks that run the model's generated programs (MBPP, HumanEval) need this: sandbox the scorer.
    allow_code_execution: bool = False

    def due(self, server_round: int, last_round: int) -> bool:
        if not self.tasks:
            return False
        return server_round == last_round or (self.every > 0 and server_round % self.every == 0)

    def validate(self) -> None:
        require(self.num_fewshot >= -1, "evaluation.lm_eval.num_fewshot must be >= 0 (or -1: the task's)")
        require(self.limit >= 0, f"evaluation.lm_eval.limit must be >= 0, got {self.limit}")
        require(self.batch_size >= 1, f"evaluation.lm_eval.batch_size must be >= 1, got {self.batch_size}")
        require(self.every >= 0, f"evaluation.lm_eval.every must be >= 0, got {self.every}")


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
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def validate(self) -> None:
        self.lm_eval.validate()
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
