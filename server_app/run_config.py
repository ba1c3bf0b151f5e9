"""The single adapter from Flower's flat run config to the typed experiment config."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import UserConfig

from finetune.config import CONFIG_GROUPS, ConfigError, ExperimentConfig, compose_config
from finetune.hub import hub_mirror

RUN_CONFIG_KEYS = (*CONFIG_GROUPS, "overrides", "hub-mirror", "output-dir")
OUTPUT_DIR_ENV = "FEDSUBSPACE_OUTPUT_DIR"
DEFAULT_OUTPUT_DIR = Path.home() / "fedsubspace-runs"


def experiment_from_run_config(run_config: UserConfig) -> ExperimentConfig:
    """Compose and validate the experiment selected by a run config.

    ``method``/``model``/``dataset``/``partition`` pick Hydra group options, ``overrides`` holds
    Hydra overrides, ``hub-mirror`` and ``output-dir`` are folders on the server's machine.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown run-config keys {unknown}; valid keys: {list(RUN_CONFIG_KEYS)}")
    selections = {group: str(run_config[group]) for group in CONFIG_GROUPS if run_config.get(group)}
    cfg = compose_config(selections, str(run_config.get("overrides", "")))

    mirror = hub_mirror(str(run_config.get("hub-mirror", "")) or cfg.hub_mirror)
    cfg.hub_mirror = str(mirror) if mirror else ""

    output = (
        str(run_config.get("output-dir", ""))
        or cfg.output_dir
        or os.environ.get(OUTPUT_DIR_ENV, "")
        or str(DEFAULT_OUTPUT_DIR)
    )
    output_path = Path(output).expanduser()
    if not output_path.is_absolute():
        # The ServerApp's working directory is the SuperLink's, not the user's.
        raise ConfigError(f"output-dir must be an absolute path, got {output!r}")
    cfg.output_dir = str(output_path)
    return cfg
