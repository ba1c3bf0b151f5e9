"""The one place that builds models: a pretrained (or config-built) model wrapped with LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
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


HEAD_MODULES = ("classifier", "score")  # sequence-classification heads (peft's SEQ_CLS list)


def build_model(cfg: ExperimentConfig, mirror: Path | None) -> torch.nn.Module:
    """The model the method trains: base + LoRA adapter (LoRA's random A seeded identically on
    every process), or the plain model with only the weights full fine-tuning trains unfrozen."""
    base = build_base_model(cfg, mirror)
    if STRATEGIES[cfg.method.name].full_finetune:
        return select_full_finetune(base, cfg)
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


def select_full_finetune(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.nn.Module:
    """Unfreeze every weight (``full_scope: all``) or those of the LoRA target modules and the
    head (``targets``, the same modules LoRA adapts: a like-for-like comparison)."""
    targets, every = set(cfg.model.lora_targets), cfg.method.full_scope == "all"
    found: set[str] = set()
    for name, param in model.named_parameters():
        modules = set(name.split(".")[:-1])
        found |= targets & modules
        param.requires_grad_(every or bool(targets & modules) or bool(set(HEAD_MODULES) & modules))
    if not every and found != targets:
        missing = sorted(targets - found)
        raise ConfigError(f"model.lora_targets {missing} name no module of {cfg.model.source!r}")
    return model


def reinitialize_lora(model: torch.nn.Module, seed: int) -> None:
    """A fresh adapter (peft's init: Kaiming-uniform A, zero B), the same on every process."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, init_lora_weights=True)


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
