"""Instruction tuning of a causal LM (GSM8K): the prompt through the tokenizer's chat template,
loss on the answer tokens only; scored by validation loss and by exact match of the final answer
of greedy generations."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from experiment_schema import ExperimentConfig
from finetune.tasks import Batch, Task, to_device

log = logging.getLogger(__name__)
IGNORE = -100  # label of the prompt's tokens: no loss
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer: "  # for tokenizers without a chat template
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """A final answer as comparable text: no thousands separators, currency or trailing dot;
    numbers in canonical form (``72.0`` → ``72``)."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(text)
    except ValueError:
        return text.lower()
    return str(int(value)) if value.is_integer() else str(value)


def reference_answer(response: str, pattern: str) -> str:
    match = re.search(pattern, response)
    return normalize_answer(match.group(1) if match else response)


def predicted_answer(generation: str, pattern: str) -> str:
    """The answer the pattern finds in a generation (GSM8K: after ####), else its last number."""
    match = re.search(pattern, generation)
    if match:
        found = NUMBER.search(match.group(1))
        return normalize_answer(found.group(0) if found else match.group(1))
    numbers = NUMBER.findall(generation)
    return normalize_answer(numbers[-1]) if numbers else ""


class InstructionTuning(Task):
    def __init__(self, cfg: ExperimentConfig, mirror: Path | None) -> None:
        from finetune.models import load_tokenizer

        super().__init__(cfg, mirror)
        self.tokenizer = load_tokenizer(cfg, mirror)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.sep_token
        self.end_text = self.tokenizer.eos_token or self.tokenizer.sep_token or ""

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.tokenizer.chat_template:
            encoded = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
            )
            ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
            return [int(i) for i in ids]  # type: ignore[arg-type]
        return self.tokenizer(PLAIN_TEMPLATE.format(prompt=prompt), add_special_tokens=True)["input_ids"]

    def prepare(self, raw: datasets.Dataset, client: int | None = None) -> datasets.Dataset:
        """``input_ids`` = prompt + answer + end token, ``labels`` = the same with the prompt
        masked; ``prompt_length`` and the ``reference`` final answer for generation. Examples whose
        answer the length limit cuts off entirely are dropped (they carry no loss)."""
        data, max_length = self.cfg.dataset, self.cfg.model.max_length

        def encode(row: dict[str, Any]) -> dict[str, Any]:
            context = row[data.context_field] if data.context_field else ""
            prompt = self.prompt_ids(row[data.prompt_field] + (f"\n\n{context}" if context else ""))
            answer = self.tokenizer(row[data.response_field] + self.end_text, add_special_tokens=False)
            ids = (prompt + answer["input_ids"])[:max_length]
            labels = ([IGNORE] * len(prompt) + answer["input_ids"])[:max_length]
            return {
                "input_ids": ids,
                "labels": labels,
                "prompt_length": min(len(prompt), max_length),
                "reference": reference_answer(row[data.response_field], data.answer_pattern),
            }

        encoded = raw.map(encode, remove_columns=raw.column_names)
        kept = encoded.filter(lambda row: row["prompt_length"] < len(row["input_ids"]))
        if len(kept) < len(encoded):
            log.warning(
                "%d of %d examples dropped: model.max_length=%d leaves no answer token",
                len(encoded) - len(kept), len(encoded), max_length,
            )  # fmt: skip
        if len(kept) == 0:
            raise ValueError(f"no example has an answer token within model.max_length={max_length}")
        return kept

    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        """Right-padded ids, attention mask and labels (padding ignored by the loss)."""
        width = max(len(row["input_ids"]) for row in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: datasets.Dataset, batch_size: int) -> dict[str, float]:
        """Loss per answer token over ``data``; exact match over its first
        ``dataset.generate_examples`` examples (when ``exact_match`` is a metric)."""
        model.eval()
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        for batch in self.batches(data, batch_size):
            batch = to_device(batch, device)
            count = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model predicts token t+1
            total += model(**batch).loss.item() * count
            tokens += count
        metrics = {"loss": total / max(tokens, 1)}
        examples = min(self.cfg.dataset.generate_examples, len(data))
        if "exact_match" in self.cfg.dataset.metrics and examples:
            metrics["exact_match"] = self.exact_match(model, data.select(range(examples)), batch_size)
        return metrics

    def generate(self, model: torch.nn.Module, prompts: list[list[int]]) -> list[str]:
        """Greedy completions of left-padded ``prompts``."""
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=self.cfg.dataset.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def exact_match(self, model: torch.nn.Module, data: datasets.Dataset, batch_size: int) -> float:
        pattern, hits = self.cfg.dataset.answer_pattern, 0
        order = np.argsort(data["prompt_length"], kind="stable")  # similar lengths pad least
        for start in range(0, len(order), batch_size):
            rows = data.select(order[start : start + batch_size])
            prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_length"], strict=True)]
            texts = self.generate(model, prompts)
            hits += sum(
                predicted_answer(text, pattern) == ref
                for text, ref in zip(texts, rows["reference"], strict=True)
            )
        return hits / len(data)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
