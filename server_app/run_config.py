"""The single adapter from Flower's flat run config to the typed experiment config."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from flwr.app import UserConfig

from experiment_schema import CONFIG_GROUPS, ConfigError, ExperimentConfig, compose_config
from finetune.hub import hub_mirror

RESUME_KEY = "resume-from"  # a run folder to continue from its newest checkpoint
FAULT_KEY = "inject-fault"  # kind:partition[:scale] (server_app/faults.py): tests and benchmarks only
RUN_CONFIG_KEYS = (*CONFIG_GROUPS, "overrides", "hub-mirror", "output-dir", RESUME_KEY, FAULT_KEY)
OUTPUT_DIR_ENV = "FEDSUBSPACE_OUTPUT_DIR"
DEFAULT_OUTPUT_DIR = Path.home() / "fedsubspace-runs"


def experiment_from_run_config(run_config: UserConfig) -> ExperimentConfig:
    """Compose and validate the experiment selected by a run config.

    ``method``/``model``/``dataset``/``partition`` pick Hydra group options, ``overrides`` holds
    Hydra overrides, ``hub-mirror`` and ``output-dir`` are folders on the server's machine.
    ``resume-from`` names a run folder to continue: without group options, its saved config with
    ``overrides`` (``key=value``) applied.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown run-config keys {unknown}; valid keys: {list(RUN_CONFIG_KEYS)}")
    selections = {group: str(run_config[group]) for group in CONFIG_GROUPS if run_config.get(group)}
    resume_from = str(run_config.get(RESUME_KEY, ""))
    if resume_from and not selections:
        cfg = saved_experiment(Path(resume_from), shlex.split(str(run_config.get("overrides", ""))))
    else:
        cfg = compose_config(selections, str(run_config.get("overrides", "")))
    if resume_from:
        cfg.output_dir = str(Path(resume_from).expanduser().resolve().parent)

    mirror = hub_mirror(str(run_config.get("hub-mirror", "")) or cfg.hub_mirror)
    cfg.hub_mirror = str(mirror) if mirror else ""

    output = (
        (cfg.output_dir if resume_from else "")
        or str(run_config.get("output-dir", ""))
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


def saved_experiment(folder: Path, overrides: list[str]) -> ExperimentConfig:
    """A run folder's saved config with ``key=value`` overrides applied (a resumed run's config)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from server_app.results import yaml_config

    try:
        saved = yaml_config(folder.expanduser())
    except FileNotFoundError as error:
        raise ConfigError(f"{RESUME_KEY}: {error}") from error
    bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
    if bad:
        raise ConfigError(f"{RESUME_KEY}: overrides of a resumed run are key=value, got {bad}")
    try:
        merged = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{RESUME_KEY}: {error}") from error
    data = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(data, dict)
    return ExperimentConfig.from_dict({str(k): v for k, v in data.items()})
