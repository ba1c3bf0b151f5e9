"""Image classification (CIFAR-10, MNIST, any Hub image dataset): images resized and normalised
as the model expects, optionally seen through a fixed per-client transformation (feature shift)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from transformers import ViTImageProcessorPil

from experiment_schema import ExperimentConfig
from finetune.tasks import Batch, Task, score_classifier

log = logging.getLogger(__name__)
SHIFT_COLUMN = "feature_shift"

SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda image: image,
    "grayscale": lambda image: ImageOps.grayscale(image).convert("RGB"),
    "invert": ImageOps.invert,
    "hflip": ImageOps.mirror,
    "vflip": ImageOps.flip,
    "rotate90": lambda image: image.rotate(90),
    "blur": lambda image: image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 32)),
    "solarize": lambda image: ImageOps.solarize(image, threshold=128),
    "contrast": lambda image: ImageEnhance.Contrast(image).enhance(0.4),
}


@dataclass(frozen=True)
class ImageSettings:
    """Square input size and per-channel normalisation (after scaling pixels to [0, 1])."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


# EfficientNet-Lite takes (x - 127) / 128 on 0..255 pixels.
EFFICIENTNET_LITE = ImageSettings(224, (127 / 255,) * 3, (128 / 255,) * 3)


def image_settings(cfg: ExperimentConfig, mirror: Path | None) -> ImageSettings:
    """The model's own preprocessing: its image processor's size and mean/std where the source has
    one, EfficientNet-Lite's for that builder, else the model config's size and mean = std = 0.5;
    ``model.image_size`` overrides the size."""
    settings = (
        EFFICIENTNET_LITE if cfg.model.builder == "efficientnet_lite0" else _processor_settings(cfg, mirror)
    )
    if cfg.model.image_size:
        settings = ImageSettings(cfg.model.image_size, settings.mean, settings.std)
    return settings


def _processor_settings(cfg: ExperimentConfig, mirror: Path | None) -> ImageSettings:
    from transformers import AutoImageProcessor

    from finetune.hub import resolve_model_source

    source = cfg.model.tokenizer or cfg.model.source
    if not source.startswith("config:"):
        try:
            processor = AutoImageProcessor.from_pretrained(resolve_model_source(source, mirror))
            size = processor.size
            side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
            return ImageSettings(int(side), tuple(processor.image_mean), tuple(processor.image_std))  # type: ignore[arg-type]
        except (OSError, ValueError) as error:
            log.info("no image processor for %s (%s): using the model config's image_size", source, error)
    side = int(cfg.model.config_overrides.get("image_size", 0) or cfg.model.image_size or 224)
    return ImageSettings(side, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class ImageClassification(Task):
    def __init__(self, cfg: ExperimentConfig, mirror: Path | None) -> None:
        super().__init__(cfg, mirror)
        self.settings = image_settings(cfg, mirror)
        self.shifts = list(cfg.partition.feature_shift)

    cache_prepared = False

    def prepare(self, raw: datasets.Dataset, client: int | None = None) -> datasets.Dataset:
        """The image and label columns (decoded per batch), plus each example's feature shift:
        the client's own, or for evaluation a mix of all of them."""
        data = self.cfg.dataset
        prepared = raw.select_columns([data.image_field, data.label_field])
        if self.shifts:
            n = len(self.shifts)
            shift = [client % n] * len(raw) if client is not None else [i % n for i in range(len(raw))]
            prepared = prepared.add_column(SHIFT_COLUMN, shift)
        return prepared

    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        data = self.cfg.dataset
        pixels = []
        for row in rows:
            image = row[data.image_field]
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"dataset field {data.image_field!r} holds {type(image).__name__}, not an image"
                )
            image = image.convert("RGB")
            if self.shifts:
                image = SHIFTS[self.shifts[row[SHIFT_COLUMN]]](image)
            pixels.append(self.settings.to_tensor(image))
        labels = torch.tensor([row[data.label_field] for row in rows], dtype=torch.long)
        return {"pixel_values": torch.stack(pixels), "labels": labels}

    def evaluate(self, model: torch.nn.Module, data: datasets.Dataset, batch_size: int) -> dict[str, float]:
        return score_classifier(model, self.batches(data, batch_size), self.cfg.dataset.metrics)

    def save(self, folder: Path) -> None:
        size = self.settings.size
        ViTImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=list(self.settings.mean),
            image_std=list(self.settings.std),
        ).save_pretrained(folder)
