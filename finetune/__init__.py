"""The ML library: models, data, local training (it knows no federation)."""

from finetune.deferred_imports import FLWR_DATASETS_PLOTS, defer_submodule

defer_submodule(FLWR_DATASETS_PLOTS)  # before finetune.data imports flwr_datasets
