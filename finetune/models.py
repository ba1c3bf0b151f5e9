"""The one place that builds models: a pretrained (or config-built) model wrapped with LoRA."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from experiment_schema import ConfigError, ExperimentConfig
from finetune.efficientnet import HEAD as EFFICIENTNET_HEAD
from finetune.efficientnet import build_efficientnet_lite0
from finetune.hub import resolve_model_source
from finetune.lora import BASE_DELTA_SUFFIX
from finetune.precision import DTYPES, device, weight_dtype
from finetune.spec import LORA_INITS, AdapterSpec
from finetune.state import lora_base_layers, set_additive_delta

log = logging.getLogger(__name__)


CACHE_ENV = "FEDSUBSPACE_CACHE"  # where de-quantized GGUF models are kept; else ~/.cache/fedsubspace
CONFIG_PREFIX = "config:"
AUTO_CLASSES = {
    "text_classification": AutoModelForSequenceClassification,
    "image_classification": AutoModelForImageClassification,
    "causal_lm": AutoModelForCausalLM,
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedsubspace").expanduser()


def dequantized_gguf(folder: str, gguf_file: str) -> Path:
    """A plain float32 copy of a GGUF checkpoint (with its tokenizer), de-quantized once (~30 s for
    SmolLM2-135M) and cached on disk: later loads take about a second. Safe when several processes
    ask at once (each writes its own temporary folder; the first rename wins)."""
    path = Path(folder) / gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file {gguf_file!r} is not in {folder}")
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root() / "gguf" / f"{path.stem}-{digest}"
    if (cached / "config.json").is_file():
        return cached
    log.info("de-quantizing %s once into %s", path, cached)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # Drop the GGUF marker so the copy is an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False  # type: ignore[assignment]
    partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(cached)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return cached


def model_folder(cfg: ExperimentConfig, mirror: Path | None) -> str:
    """Where the model's weights and config are read from (a de-quantized GGUF copy if need be)."""
    source = resolve_model_source(cfg.model.source, mirror)
    return str(dequantized_gguf(source, cfg.model.gguf_file)) if cfg.model.gguf_file else source


def load_tokenizer(cfg: ExperimentConfig, mirror: Path | None) -> PreTrainedTokenizerBase:
    if cfg.model.tokenizer:
        return AutoTokenizer.from_pretrained(resolve_model_source(cfg.model.tokenizer, mirror))
    if cfg.model.source.startswith(CONFIG_PREFIX):
        raise ConfigError(f"model.source={cfg.model.source!r} has no tokenizer: set model.tokenizer")
    return AutoTokenizer.from_pretrained(model_folder(cfg, mirror))


def _model_config(cfg: ExperimentConfig, mirror: Path | None) -> PretrainedConfig:
    """The architecture with the experiment's ``config_overrides`` (random-weight models)."""
    source = cfg.model.source
    if cfg.model.architecture:  # the published shapes, written into the model's YAML
        architecture = dict(cfg.model.architecture)
        config = AutoConfig.for_model(architecture.pop("model_type"), **architecture)
    elif source.startswith(CONFIG_PREFIX):
        config = AutoConfig.for_model(source[len(CONFIG_PREFIX) :])
    else:
        config = AutoConfig.from_pretrained(model_folder(cfg, mirror))
    if cfg.dataset.is_classification:
        config.num_labels = cfg.dataset.num_labels
    for key, value in cfg.model.config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides: {type(config).__name__} has no {key!r}")
        setattr(config, key, value)
    return config


def build_base_model(
    cfg: ExperimentConfig, mirror: Path | None, on: torch.device | None = None
) -> torch.nn.Module:
    """The task model (a fresh ``num_labels`` head for classification), seeded so every process
    agrees: pretrained weights, or random ones built from the architecture (``model.weights``)."""
    torch.manual_seed(cfg.seed)
    if cfg.model.builder == "efficientnet_lite0":
        return build_efficientnet_lite0(cfg.dataset.num_labels, pretrained=not cfg.model.random_weights)
    auto = AUTO_CLASSES[cfg.dataset.task]
    dtype, quantization = weight_dtype(cfg.model), quantization_config(cfg)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected
    try:
        if cfg.model.random_weights:
            if quantization is None:
                return auto.from_config(_model_config(cfg, mirror)).to(dtype)
            # quantization happens while loading weights; bfloat16 halves the file (8 B: 16 GB)
            folder = str(random_checkpoint(cfg, lambda: auto.from_config(_model_config(cfg, mirror))))
        else:
            folder = model_folder(cfg, mirror)
        extra: dict[str, Any] = (
            {"num_labels": cfg.dataset.num_labels} if cfg.dataset.is_classification else {}
        )
        if cfg.dataset.task == "image_classification":
            extra["ignore_mismatched_sizes"] = True  # an ImageNet head replaced by ours
        if quantization is not None:
            extra.update(quantization_config=quantization, device_map={"": str(on or device())})
        return auto.from_pretrained(folder, dtype=dtype, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)


def quantization_config(cfg: ExperimentConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes' nf4 (QLoRA) or LLM.int8 for the frozen weights; the head stays unquantized."""
    model = cfg.model
    if model.quantization == "none":
        return None
    keep = [*head_modules(cfg), "lm_head"]  # trained (the head) or tied to the embeddings
    if model.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=model.quant_double,
        bnb_4bit_compute_dtype=DTYPES[model.quant_compute_dtype],
        llm_int8_skip_modules=keep,
    )


def random_checkpoint(cfg: ExperimentConfig, build: Callable[[], torch.nn.Module]) -> Path:
    """A randomly initialised model (``build()``) saved once in bfloat16, keyed by its config and
    seed, so that it can be loaded quantized: every process gets the same weights, quantized the
    same way, and only the first builds them (an 8 B model takes a minute to initialise)."""
    identity = [
        cfg.model.source,
        cfg.model.config_overrides,
        *([cfg.model.architecture] if cfg.model.architecture else []),
        cfg.seed,
        cfg.dataset.num_labels,
        cfg.dataset.task,
        "bfloat16",
    ]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = cache_root() / "random" / key
    if not (folder / "config.json").is_file():
        partial = folder.with_name(f"{key}.partial-{os.getpid()}")
        build().to(torch.bfloat16).save_pretrained(partial)  # type: ignore[operator]
        try:
            partial.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def head_modules(cfg: ExperimentConfig) -> list[str]:
    """Modules trained in full beside LoRA: ``model.head_modules``, else the architecture's task
    head (none for a causal LM, whose output layer is tied to the embeddings)."""
    if cfg.model.head_modules:
        return list(cfg.model.head_modules)
    if cfg.model.builder == "efficientnet_lite0":
        return [EFFICIENTNET_HEAD]
    return {"text_classification": ["classifier", "score"], "image_classification": ["classifier"]}.get(
        cfg.dataset.task, []
    )


def lora_config(cfg: ExperimentConfig, adapter: AdapterSpec) -> LoraConfig:
    task_type = {"text_classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}.get(
        cfg.dataset.task
    )
    heads = head_modules(cfg)
    if adapter.init not in LORA_INITS:
        raise ConfigError(f"unknown LoRA init {adapter.init!r}; valid: {sorted(LORA_INITS)}")
    return LoraConfig(
        task_type=task_type,
        init_lora_weights=LORA_INITS[adapter.init],  # type: ignore[arg-type]
        r=adapter.rank,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft reads a float as well
        lora_dropout=adapter.dropout,
        target_modules=list(cfg.model.lora_targets),
        modules_to_save=heads
        if (heads and task_type != TaskType.SEQ_CLS) or cfg.model.head_modules
        else None,
    )


def build_model(
    cfg: ExperimentConfig, mirror: Path | None, adapter: AdapterSpec, on: torch.device | None = None
) -> torch.nn.Module:
    """The model ``adapter`` describes: base + LoRA adapter (LoRA's random A seeded identically on
    every process), or the plain model with only the weights full fine-tuning trains unfrozen."""
    base = build_base_model(cfg, mirror, on)
    checkpointing = cfg.train.gradient_checkpointing
    if cfg.model.quantization != "none":  # float32 norms and head, inputs that carry gradients
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
        base.enable_input_require_grads()  # type: ignore[operator]
    if adapter.kind == "full":
        return select_full_finetune(base, cfg, every=adapter.full_scope == "all")
    try:
        torch.manual_seed(cfg.seed + 1)
        model = get_peft_model(base, lora_config(cfg, adapter))
    except ValueError as error:  # e.g. target modules not found
        raise ConfigError(f"cannot apply LoRA to {cfg.model.source!r}: {error}") from error
    if adapter.freeze_lora_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if adapter.kind == "lora_latent":
        insert_latent(model, adapter.rank)
    return model


class LatentFactor(torch.nn.Module):
    """A LoRA ``A`` followed by a trainable r × r latent ``R`` (``kind="lora_latent"``): stands in
    for peft's ``lora_A`` module, so peft computes ``s B (R (A x))``. ``weight`` is A (frozen);
    ``latent`` is R."""

    def __init__(self, lora_a: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.weight = lora_a.weight
        self.weight.requires_grad_(False)
        self.latent = torch.nn.Parameter(
            torch.eye(rank, dtype=lora_a.weight.dtype, device=lora_a.weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.weight), self.latent)


def insert_latent(model: torch.nn.Module, rank: int) -> None:
    """Turn every LoRA layer into LoRA-SB's: A and B frozen, an r × r R trained between them."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, factor in list(module.lora_A.items()):
                assert isinstance(factor, torch.nn.Linear)
                module.lora_A[adapter] = LatentFactor(factor, rank)
                module.lora_B[adapter].weight.requires_grad_(False)


def fold_latent(model: torch.nn.Module) -> None:
    """Replace every LoRA-SB ``(A, R)`` by the plain LoRA factor ``R A``: the same function, and an
    adapter any peft loads."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, factor in list(module.lora_A.items()):
                if isinstance(factor, LatentFactor):
                    plain = torch.nn.Linear(factor.weight.shape[1], factor.weight.shape[0], bias=False)
                    plain = plain.to(device=factor.weight.device, dtype=factor.weight.dtype)
                    with torch.no_grad():
                        plain.weight.copy_(factor.latent @ factor.weight)
                    module.lora_A[adapter] = plain


def is_target(module: str, targets: list[str]) -> bool:
    """Whether a module name is one of ``targets``, matched on its last dotted part(s) as peft
    does (``query``, ``_project_conv.linear``)."""
    return any(module == t or module.endswith("." + t) for t in targets)


def select_full_finetune(model: torch.nn.Module, cfg: ExperimentConfig, every: bool) -> torch.nn.Module:
    """Unfreeze every weight (``every``) or those of the LoRA target modules and the head (the
    same modules LoRA adapts: a like-for-like comparison)."""
    targets = set(cfg.model.lora_targets)
    heads = set(head_modules(cfg))
    found: set[str] = set()
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        hits = {t for t in targets if is_target(module, [t])}
        found |= hits
        is_head = bool(heads & set(module.split(".")))
        param.requires_grad_(every or bool(hits) or is_head)
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


def freeze_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Keep BatchNorm layers on their pretrained running statistics while training: no rule
    averages those buffers, so updating them locally would leave every client (and the server)
    normalising differently. Call after ``model.train()``."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


BASE_DELTAS_FILE = "base_deltas.safetensors"


def load_trained_adapter(cfg: ExperimentConfig, folder: Path, mirror: Path | None) -> torch.nn.Module:
    """A run's saved adapter on its base, as the run's config builds it (quantized where it was),
    with the merged updates of ``base_deltas.safetensors`` (FLoRA / FedEx-LoRA on a quantized or
    low-precision base) added in the forward pass, as during training."""
    model = PeftModel.from_pretrained(build_base_model(cfg, mirror), folder)
    deltas_file = folder / BASE_DELTAS_FILE
    if deltas_file.exists():
        layers = lora_base_layers(model)
        for key, delta in load_file(str(deltas_file)).items():
            prefix = key.removesuffix(BASE_DELTA_SUFFIX)
            if prefix not in layers:
                raise KeyError(f"{deltas_file}: a delta for {prefix!r}, a layer the adapter does not adapt")
            weight = layers[prefix].get_base_layer().weight
            assert isinstance(weight, torch.Tensor)
            set_additive_delta(layers[prefix], delta.to(weight.device))
    return model
