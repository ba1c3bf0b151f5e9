"""Text classification (GLUE-style): one or two text fields and a label."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorWithPadding

from experiment_schema import ExperimentConfig
from finetune.tasks import Batch, Task, score_classifier

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


class TextClassification(Task):
    def __init__(self, cfg: ExperimentConfig, mirror: Path | None) -> None:
        from finetune.models import load_tokenizer

        super().__init__(cfg, mirror)
        self.tokenizer = load_tokenizer(cfg, mirror)
        self._pad = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")

    def prepare(self, raw: datasets.Dataset, client: int | None = None) -> datasets.Dataset:
        """Token ids without padding (padding happens per batch) plus ``labels``."""
        data, max_length = self.cfg.dataset, self.cfg.model.max_length

        def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            texts = [batch[name] for name in data.text_fields]
            encoded = self.tokenizer(*texts, truncation=True, max_length=max_length)
            encoded["labels"] = batch[data.label_field]
            return encoded

        tokenized = raw.map(encode, batched=True, remove_columns=raw.column_names)
        keep = {*TOKEN_COLUMNS, "labels"}
        return tokenized.remove_columns([c for c in tokenized.column_names if c not in keep])

    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        return dict(self._pad(rows))

    def evaluate(self, model: torch.nn.Module, data: datasets.Dataset, batch_size: int) -> dict[str, float]:
        return score_classifier(model, self.batches(data, batch_size), self.cfg.dataset.metrics)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
