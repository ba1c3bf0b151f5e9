"""What a node keeps on its own disk, beyond one Flower run: the rule state of an experiment (so a
resumed run continues where it stopped) and the privacy ledger of its data (so ε never resets).

Layout under the node's state folder (node config ``state-dir``; else the experiment's
``node_state_dir``, ``$FEDSUBSPACE_STATE_DIR``, ``~/.cache/fedsubspace/node-state``)::

    experiments/<experiment id>/partition-<p>/round-00003/{arrays.safetensors,values.json}
    privacy-ledger/<data key>.jsonl

A round's state is written (then renamed into place) after the node trained that round; a resumed
run's first message restores the newest state from before its round — a state written for a round
the server never checkpointed is skipped, so both sides restart from the same round.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict, UserConfig
from safetensors.numpy import load_file, save_file

from experiment_schema import ExperimentConfig
from finetune.records import from_record, to_record

log = logging.getLogger(__name__)

STATE_DIR_KEY = "state-dir"  # node config
STATE_DIR_ENV = "FEDSUBSPACE_STATE_DIR"
DEFAULT_STATE_DIR = Path.home() / ".cache" / "fedsubspace" / "node-state"
RESTORED = "durable-restored"  # node state: this run's state was looked for on disk already
KEEP_ROUNDS = 3
ARRAYS_FILE, VALUES_FILE = "arrays.safetensors", "values.json"
SEPARATOR = "::"  # <record name>::<array name> in the arrays file


def node_state_dir(node_config: UserConfig, cfg: ExperimentConfig) -> Path:
    """Where this node keeps state that outlives a run: its operator's choice first."""
    chosen = (
        str(node_config.get(STATE_DIR_KEY, ""))
        or cfg.node_state_dir
        or os.environ.get(STATE_DIR_ENV, "")
        or str(DEFAULT_STATE_DIR)
    )
    return Path(chosen).expanduser()


class DurableState:
    """One node's rule state for one experiment and partition, one folder per trained round."""

    def __init__(self, root: Path, experiment_id: str, partition_id: int) -> None:
        self.folder = root / "experiments" / experiment_id / f"partition-{partition_id}"

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        names = (p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("round-"))
        return sorted(int(n[6:]) for n in names if n[6:].isdigit())

    def save(self, records: RecordDict, server_round: int, skip: Iterable[str] = ()) -> None:
        """The node state after ``server_round``'s training (``skip``: records the server resyncs)."""
        left_out = {RESTORED, *skip}
        arrays: dict[str, np.ndarray] = {}
        for name, record in records.array_records.items():
            if name not in left_out:
                arrays.update({f"{name}{SEPARATOR}{k}": v for k, v in from_record(record).items()})
        values = {n: dict(r) for n, r in records.config_records.items() if n not in left_out}
        if not arrays and not values and not self.rounds():  # nothing kept (FedIT): nothing written
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"round-{server_round:05d}"
        partial = self.folder / f".round-{server_round:05d}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(partial / ARRAYS_FILE))
        (partial / VALUES_FILE).write_text(json.dumps(values))
        if target.exists():
            shutil.rmtree(target)
        os.rename(partial, target)
        for old in self.rounds()[:-KEEP_ROUNDS]:
            shutil.rmtree(self.folder / f"round-{old:05d}", ignore_errors=True)

    def restore(self, records: RecordDict, before_round: int) -> int | None:
        """Load the newest state saved for a round before ``before_round`` into ``records``;
        the round it came from, or None when there is none."""
        earlier = [r for r in self.rounds() if r < before_round]
        if not earlier:
            return None
        folder = self.folder / f"round-{earlier[-1]:05d}"
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in load_file(str(folder / ARRAYS_FILE)).items():
            name, _, array = key.partition(SEPARATOR)
            grouped.setdefault(name, {})[array] = value
        for name, arrays in grouped.items():
            records[name] = to_record(arrays)
        for name, values in json.loads((folder / VALUES_FILE).read_text()).items():
            records[name] = ConfigRecord(values)
        return earlier[-1]


def restore_once(records: RecordDict, store: DurableState, server_round: int) -> None:
    """On a run's first message to this node, bring back what the node kept for the experiment
    (a resumed run); later messages find the run's own state in Flower's context."""
    if RESTORED in records.config_records:
        return
    restored = store.restore(records, server_round)
    records[RESTORED] = ConfigRecord({"from-round": -1 if restored is None else restored})
    if restored is not None:
        log.info("restored this node's state after round %d from %s", restored, store.folder)
