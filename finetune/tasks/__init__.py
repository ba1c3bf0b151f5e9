"""What differs between modalities, behind one interface: how raw examples become model inputs
(tokens, pixels, prompt + answer tokens), how a batch is collated, and how a model is scored.

Training (``finetune/training.py``), clients, the server and the benchmarks only talk to a
:class:`Task`; :func:`build_task` picks the one ``dataset.task`` names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from experiment_schema import ExperimentConfig
from finetune.metrics import compute_metrics

Batch = dict[str, torch.Tensor]


class Task(ABC):
    """One modality's data preparation, batching and evaluation for an experiment."""

    #: Whether prepared data is worth keeping on disk (tokenizing is; selecting image columns is not).
    cache_prepared = True

    def __init__(self, cfg: ExperimentConfig, mirror: Path | None) -> None:
        self.cfg = cfg
        self.mirror = mirror

    @abstractmethod
    def prepare(self, raw: datasets.Dataset, client: int | None = None) -> datasets.Dataset:
        """Model-ready examples of ``raw`` for ``client`` (its feature shift), or for the
        server's evaluation set when None."""

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        """A batch of tensors (with ``labels``) from prepared rows."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: datasets.Dataset, batch_size: int) -> dict[str, float]:
        """Mean loss and the dataset's metrics of ``model`` on prepared ``data``."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write what a user needs beside the weights to run the model (tokenizer, processor)."""

    def eval_order(self, data: datasets.Dataset) -> np.ndarray:
        """The order evaluation batches are drawn in (by length for text: least padding)."""
        if "input_ids" in data.column_names:
            return np.argsort([len(ids) for ids in data["input_ids"]], kind="stable")
        return np.arange(len(data))

    def batches(self, data: datasets.Dataset, batch_size: int) -> Iterator[Batch]:
        """Evaluation batches, on the device of nothing in particular (the caller moves them)."""
        from finetune.data import iterate_batches

        return iterate_batches(data, self.collate, batch_size, order=self.eval_order(data))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def score_classifier(
    model: torch.nn.Module, batches: Iterable[Batch], metric_names: list[str]
) -> dict[str, float]:
    """Mean cross-entropy and label metrics of a classifier (text or image) over ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    losses, preds, labels = [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        out = model(**batch)
        losses.append(out.loss.item() * batch["labels"].shape[0])
        preds.append(out.logits.argmax(dim=-1).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    pred, true = np.concatenate(preds), np.concatenate(labels)
    names = [name for name in metric_names if name != "loss"]
    return {"loss": float(sum(losses) / len(true)), **compute_metrics(names, pred, true)}


def build_task(cfg: ExperimentConfig, mirror: Path | None) -> Task:
    """The task ``cfg.dataset.task`` names, with its tokenizer or image settings loaded."""
    if cfg.dataset.task == "image_classification":
        from finetune.tasks.image import ImageClassification

        return ImageClassification(cfg, mirror)
    if cfg.dataset.task == "causal_lm":
        from finetune.tasks.causal import InstructionTuning

        return InstructionTuning(cfg, mirror)
    from finetune.tasks.text import TextClassification

    return TextClassification(cfg, mirror)


__all__ = ["Batch", "Task", "build_task", "score_classifier", "to_device"]
