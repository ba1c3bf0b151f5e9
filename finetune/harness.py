"""EleutherAI's lm-evaluation-harness on the in-memory model (``evaluation.lm_eval``): the model as
the rule produced it (adapter, merged base, quantized base) wrapped in the harness's ``HFLM``, no
save-and-reload round trip. Tasks read their data offline first: a Hub dataset the harness asks for
is read from the local mirror (``<mirror>/<repo id>/<config>/<split>-*.parquet``) when it is there,
and a task whose data is neither there nor reachable fails before any training, naming the task
and the path. Local tasks in the harness's YAML format are found in ``lm_eval.include``."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from experiment_schema import ConfigError, ExperimentConfig
from finetune.data import DataNotFoundError
from finetune.hub import mirrored_dataset_dir

log = logging.getLogger(__name__)
#: Metric keys the harness reports beside the scores.
NOT_SCORES = ("alias", "name", "sample_len", "samples")


def offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


@contextlib.contextmanager
def mirrored_datasets(mirror: Path | None, include: Path | None = None) -> Iterator[None]:
    """``datasets.load_dataset`` of a Hub dataset reads the mirror's parquet files when the mirror
    holds it; offline, a dataset it does not hold is a :class:`DataNotFoundError` naming the path.
    A local task's relative ``data_files`` are read beside its YAML (in ``include``)."""
    import datasets

    load = datasets.load_dataset

    def load_mirrored(path: str, name: str | None = None, **kwargs: Any) -> Any:
        if include is not None and kwargs.get("data_files"):
            kwargs["data_files"] = beside(include, kwargs["data_files"])
        folder = mirrored_dataset_dir(mirror, path, name or "default") if "/" in str(path) else None
        if folder is not None:
            files: dict[str, list[str]] = {}
            for parquet in sorted(folder.glob("*.parquet")):
                files.setdefault(parquet.name.split("-")[0], []).append(str(parquet))
            kwargs.pop("data_files", None)
            kwargs.pop("data_dir", None)
            return load("parquet", data_files=files, **kwargs)
        if offline() and "/" in str(path) and not Path(path).exists():
            where = f"{mirror}/{path}/{name or 'default'}/" if mirror else "(no mirror configured)"
            raise DataNotFoundError(f"the harness needs the Hub dataset {path!r} ({name or 'default'}), "
                                    f"which is not in the mirror {where} and the Hub is offline")  # fmt: skip
        return load(path, name, **kwargs)

    datasets.load_dataset = load_mirrored
    try:
        yield
    finally:
        datasets.load_dataset = load


def beside(folder: Path, files: Any) -> Any:
    """``data_files`` (a path, a list, or a split -> paths mapping) with relative paths made
    relative to ``folder``."""
    if isinstance(files, dict):
        return {split: beside(folder, paths) for split, paths in files.items()}
    if isinstance(files, list | tuple):
        return [beside(folder, path) for path in files]
    path = Path(str(files)).expanduser()
    return str(path if path.is_absolute() else folder / path)


def with_end_token(tokenizer: Any) -> Any:
    """The tokenizer, or a copy of it whose end-of-text token is its separator where it has no
    end-of-text token of its own (an encoder's vocabulary): the harness stops generating there."""
    if tokenizer is None or tokenizer.eos_token is not None or tokenizer.sep_token is None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


class Harness:
    """The experiment's ``evaluation.lm_eval`` tasks, checked once and scored on demand."""

    def __init__(self, cfg: ExperimentConfig, mirror: Path | None, tokenizer: Any) -> None:
        self.settings = cfg.evaluation.lm_eval
        self.mirror, self.tokenizer = mirror, with_end_token(tokenizer)
        self.include = task_folder(self.settings.include)
        if self.include is not None and not self.include.is_dir():
            raise ConfigError(f"evaluation.lm_eval.include={self.settings.include!r} is not a folder")
        self.task_manager = task_manager(str(self.include) if self.include else None)

    def check(self) -> None:
        """Every task exists and its data can be read: before any training."""
        from lm_eval.tasks import get_task_dict

        unknown = [t for t in self.settings.tasks if t not in self.task_manager.all_tasks]
        if unknown:
            where = f" or in {self.settings.include}" if self.settings.include else ""
            raise ConfigError(
                f"evaluation.lm_eval.tasks: no harness task named {unknown} (none in lm-eval{where})"
            )
        for task in self.settings.tasks:
            try:
                with mirrored_datasets(self.mirror, self.include):
                    get_task_dict([task], self.task_manager)
            except DataNotFoundError as error:
                raise ConfigError(f"evaluation.lm_eval task {task!r}: {error}") from error

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """``lm_<task>_<metric>`` for every task (and group) and metric the harness reports."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        tok = self.tokenizer
        prefix = next(
            (t for t in (tok.bos_token_id, tok.eos_token_id, tok.cls_token_id) if t is not None), None
        )
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=self.settings.batch_size, device=device,
                  prefix_token_id=prefix)  # fmt: skip
        was_training = model.training
        with mirrored_datasets(self.mirror, self.include), torch.no_grad():
            results = simple_evaluate(
                model=lm,
                tasks=list(self.settings.tasks),
                num_fewshot=None if self.settings.num_fewshot < 0 else self.settings.num_fewshot,
                limit=self.settings.limit or None,
                task_manager=self.task_manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
                confirm_run_unsafe_code=self.settings.allow_code_execution,
            )  # fmt: skip
        model.train(was_training)
        assert results is not None
        out = scores(results["results"])
        if self.settings.average:
            main = [main_score(results["results"][task]) for task in self.settings.tasks]
            out[f"lm_{self.settings.average}"] = sum(main) / len(main)
        return out


#: A task's main score, the first of these it reports (the leaderboards' choice).
MAIN_SCORES = ("acc", "exact_match", "pass@1", "pass_at_1", "f1", "mcc")


def main_score(metrics: dict[str, Any]) -> float:
    """The task's main score: its accuracy, exact match or pass@1 (any filter)."""
    for name in MAIN_SCORES:
        for key, value in metrics.items():
            if key.partition(",")[0] == name and isinstance(value, int | float):
                return float(value)
    raise ValueError(f"no main score ({', '.join(MAIN_SCORES)}) among {sorted(metrics)}")


@functools.cache
def task_manager(include: str | None) -> Any:
    """The harness's index of its tasks (and ``include``'s): built once a process, as it reads
    thousands of task files (seconds), where a client scores every k rounds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def task_folder(setting: str) -> Path | None:
    """``evaluation.lm_eval.include``: absolute, or relative to the working folder, else to the
    project (``evals/flowertune`` wherever the app runs from)."""
    if not setting:
        return None
    path = Path(setting).expanduser()
    if not path.is_absolute() and not path.is_dir():
        path = Path(__file__).resolve().parent.parent / path
    return path.resolve()


def scores(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The harness's results as flat metric names: ``acc,none`` of ``arc_easy`` → ``lm_arc_easy_acc``,
    ``exact_match,strict-match`` of ``gsm8k`` → ``lm_gsm8k_exact_match_strict_match``."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in NOT_SCORES or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            name = f"lm_{task}_{metric}" + ("" if filter_name in ("", "none") else f"_{filter_name}")
            out[re.sub(r"[^0-9A-Za-z_]+", "_", name)] = float(value)
    return out
