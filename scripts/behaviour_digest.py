"""A digest of every federated rule's behaviour, to show a refactoring changed none of it.

Each rule runs three rounds in process (the engine, the real client function, tiny_bert, three
nodes of which two are sampled a round, so catch-up and partial participation happen); the line
per rule holds the sha256 of the global arrays after each round and the bytes of round 3. Run it
at two commits and diff the outputs (it imports the code of the folder it runs in), from the
checkout:

    git worktree add ../old <commit>
    (cd ../old && ../main/.venv/bin/python ../main/scripts/behaviour_digest.py) | grep -v INFO > old.txt
    .venv/bin/python scripts/behaviour_digest.py | grep -v INFO > new.txt && diff old.txt new.txt
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

OVERRIDES = [
    "partition.num_clients=3",
    "dataset.max_train_examples=200",
    "dataset.max_eval_examples=64",
    "federation.fraction_train=0.67",
    "train.local_steps=2",
    "train.batch_size=4",
]


def digest(name: str, hub: str) -> str:
    from fakes import FakeGrid, real_clients

    from experiment_schema import compose_config
    from finetune.models import build_model
    from finetune.records import from_record, to_record
    from finetune.state import trainable_state
    from server_app.loop import exchange
    from strategies import get_rule
    from strategies.protocol import Instruction

    cfg = compose_config({"model": "tiny_bert", "method": name}, OVERRIDES)
    cfg.hub_mirror = hub
    rule = get_rule(name)
    strategy = rule.build_strategy(cfg)
    grid: Any = FakeGrid({101: 0, 102: 1, 103: 2}, real_clients({101: 0, 102: 1, 103: 2}))
    server_state = trainable_state(build_model(cfg, Path(hub), rule.server_adapter(cfg)))
    arrays = strategy.setup(
        grid, to_record(strategy.initial_state(server_state)), Instruction(cfg.to_json()).to_config()
    )
    hashes = []
    for server_round in (1, 2, 3):
        config = Instruction(cfg.to_json(), server_round=server_round, lr=1e-2).to_config()
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        new, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=5.0))
        arrays = new if new is not None else arrays
        sha = hashlib.sha256()
        for key, value in sorted(from_record(arrays).items()):
            sha.update(key.encode())
            sha.update(value.tobytes())
        hashes.append(sha.hexdigest()[:16])
    stats = strategy.rounds[3]
    down, up = sorted(stats.bytes_down.items()), sorted(stats.bytes_up.items())
    return f"{name} {' '.join(hashes)} down={down} up={up}"


def main(names: list[str]) -> None:
    sys.path[:0] = [os.getcwd(), str(Path(os.getcwd()) / "tests")]
    os.environ.setdefault("FEDSUBSPACE_STATE_DIR", tempfile.mkdtemp())
    from finetune.hub import default_hub_mirror
    from strategies import RULES

    hub = default_hub_mirror()
    for name in names or sorted(n for n, r in RULES.items() if not r.centralized):
        print(digest(name, hub), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
