"""The one place that builds models: a pretrained (or config-built) model wrapped with LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from finetune.config import ConfigError, ExperimentConfig
from finetune.hub import resolve_model_source
from strategies import STRATEGIES

log = logging.getLogger(__name__)


def load_tokenizer(cfg: ExperimentConfig, mirror: Path | None) -> PreTrainedTokenizerBase:
    source = resolve_model_source(cfg.model.source, mirror)
    return AutoTokenizer.from_pretrained(source)


def build_base_model(cfg: ExperimentConfig, mirror: Path | None) -> torch.nn.Module:
    """The task model with a fresh ``num_labels`` head, seeded so every process agrees."""
    source = resolve_model_source(cfg.model.source, mirror)
    torch.manual_seed(cfg.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected
    try:
        if cfg.model.random_init:
            config = AutoConfig.from_pretrained(source, num_labels=cfg.dataset.num_labels)
            for key, value in cfg.model.config_overrides.items():
                if not hasattr(config, key):
                    raise ConfigError(f"model.config_overrides: {type(config).__name__} has no {key!r}")
                setattr(config, key, value)
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=cfg.dataset.num_labels, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def lora_config(cfg: ExperimentConfig) -> LoraConfig:
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,  # also trains and saves the classifier head
        r=cfg.method.rank,
        lora_alpha=cfg.method.alpha,
        lora_dropout=cfg.method.dropout,
        target_modules=list(cfg.model.lora_targets),
    )


def build_model(cfg: ExperimentConfig, mirror: Path | None) -> PeftModel:
    """Base model + LoRA adapter; LoRA's random A is seeded identically on every process."""
    base = build_base_model(cfg, mirror)
    try:
        torch.manual_seed(cfg.seed + 1)
        model = get_peft_model(base, lora_config(cfg))
    except ValueError as error:  # e.g. target modules not found
        raise ConfigError(f"cannot apply LoRA to {cfg.model.source!r}: {error}") from error
    if STRATEGIES[cfg.method.name].freeze_lora_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
