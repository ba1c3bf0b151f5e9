"""Shared fixtures: offline Hub settings, the data mirror, tiny experiment configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Tests never reach the Hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Node state and privacy ledgers of the tests' nodes (the Flower processes they start inherit it)
# never touch the user's own ~/.cache/fedsubspace/node-state.
os.environ["FEDSUBSPACE_STATE_DIR"] = tempfile.mkdtemp(prefix="fedsubspace-node-state-")
# ... nor its cache of prepared partitions (shared by the session's tests: its keys cover the data)
os.environ["FEDSUBSPACE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedsubspace-prepared-")

import pytest

import strategies  # noqa: F401  (registers every rule's config schema, as the apps do)
from experiment_schema import ExperimentConfig, compose_config
from finetune.hub import default_hub_mirror

TINY_OVERRIDES = [
    "partition.num_clients=2",
    "dataset.max_train_examples=200",
    "dataset.max_eval_examples=64",
    "federation.num_rounds=2",
    "federation.fraction_train=1.0",
    "train.local_steps=2",
    "train.batch_size=8",
]
#: A 2-node simulation with 2 CPUs a client: on this 2-core machine one Ray actor serves both nodes;
#: each actor imports the client stack (a resume test: 114 CPU-seconds with two actors, 64 with one,
#: `python -m benchmarks.cpu_busy --interval 1 -- pytest tests/test_e2e_resume.py -k flora`)
ONE_ACTOR_FEDERATION = "num-supernodes=2 client-resources-num-cpus=2 client-resources-num-gpus=0.0"


@pytest.fixture(autouse=True)
def node_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh node-state folder (ledgers included) for each in-process test."""
    folder = tmp_path_factory.mktemp("node-state")
    monkeypatch.setenv("FEDSUBSPACE_STATE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def hub_mirror() -> Path:
    mirror = default_hub_mirror()
    if not mirror:
        pytest.fail("no data mirror: set FEDSUBSPACE_HUB_MIRROR or place the mirror at ../shared/data/hub")
    return Path(mirror)


@pytest.fixture
def tiny_cfg(hub_mirror: Path) -> ExperimentConfig:
    cfg = compose_config({"model": "tiny_bert"}, TINY_OVERRIDES)
    cfg.hub_mirror = str(hub_mirror)
    return cfg


def adapter_of(cfg: ExperimentConfig, rank: int | None = None):
    """What a client of ``cfg``'s rule trains (its rule's default adapter)."""
    from strategies import get_rule

    return get_rule(cfg.method.name).client.default_adapter(cfg, rank)


def node_state_of(root: Path, run_folder: Path) -> dict[int, dict[int, dict[str, object]]]:
    """What the nodes kept on disk under ``root`` for ``run_folder``'s experiment
    (``client_app.durable``'s layout): partition → round → its files' contents and the folder's
    mtime; {} when they kept nothing. The contents compare with ``==``."""
    from safetensors.numpy import load_file

    from client_app.durable import ARRAYS_FILE, VALUES_FILE
    from server_app.results import yaml_config

    experiment = root / "experiments" / str(yaml_config(run_folder)["experiment_id"])
    kept: dict[int, dict[int, dict[str, object]]] = {}
    for partition in sorted(experiment.glob("partition-*")):
        rounds = kept.setdefault(int(partition.name.removeprefix("partition-")), {})
        for folder in sorted(partition.glob("round-*")):
            arrays = load_file(str(folder / ARRAYS_FILE))
            rounds[int(folder.name.removeprefix("round-"))] = {
                "mtime_ns": folder.stat().st_mtime_ns,
                "arrays": {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in arrays.items()},
                "values": (folder / VALUES_FILE).read_text(),
            }
    return kept


def contents(kept_round: dict[str, object]) -> dict[str, object]:
    """A kept round of :func:`node_state_of` without its mtime."""
    return {k: v for k, v in kept_round.items() if k != "mtime_ns"}


#: The modules that start real Flower processes (and the longest in-process ones), longest first
#: (their seconds in a serial run, commit b968792): `make test`'s two workers take whole modules in
#: collection order (``--no-loadscope-reorder``), alternately at first, so these start first and the
#: quick modules fill in around them, instead of a long module starting last while the other idles.
LONGEST_FIRST = (
    "test_e2e_simulation.py", "test_e2e_resume.py", "test_deployment.py", "test_warm_node.py",
    "test_shutdown.py", "test_sweep_runner.py", "test_modalities.py", "test_sweep.py", "test_compose.py",
    "test_harness.py",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's order kept
