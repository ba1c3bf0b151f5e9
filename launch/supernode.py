"""``flower-supernode`` with a shorter idle poll (``fedsubspace-supernode``).

Flower 1.41's SuperNode sleeps a fixed 3 s whenever it asks the SuperLink for a message and none is
waiting, and 0.5 s between checks for a reply to push. Between rounds the server aggregates and
evaluates, so a node usually finds nothing and sleeps: each node then starts the next round up to
3 s late, at a different moment from the others, and the round waits for the latest. This entry
point runs Flower's own SuperNode unchanged except for those sleeps, capped at ``--idle-poll``
seconds (default 0.5; ``3`` is Flower's behaviour). The cost is one more small request to the
SuperLink per node every ``--idle-poll`` seconds while idle.

    fedsubspace-supernode --idle-poll 0.5 --superlink ... --isolation process ...  # + flower-supernode flags
"""

from __future__ import annotations

import sys
import time
from types import ModuleType
from typing import Any

DEFAULT_IDLE_POLL = 0.5


class CappedSleep:
    """The ``time`` module, but ``sleep`` never longer than ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def idle_poll(argv: list[str]) -> tuple[float, list[str]]:
    """``--idle-poll S`` (or ``--idle-poll=S``) out of the SuperNode's arguments."""
    rest, cap = [], DEFAULT_IDLE_POLL
    items = iter(argv)
    for item in items:
        if item == "--idle-poll":
            cap = float(next(items, ""))
        elif item.startswith("--idle-poll="):
            cap = float(item.split("=", 1)[1])
        else:
            rest.append(item)
    if not cap > 0:
        raise SystemExit(f"--idle-poll must be > 0 seconds, got {cap}")
    return cap, rest


def patch(module: ModuleType, cap: float) -> None:
    module.time = CappedSleep(cap)  # type: ignore[attr-defined]


def main() -> None:
    cap, sys.argv[1:] = idle_poll(sys.argv[1:])
    from launch.flower_contract import require

    require()
    import flwr.supernode.start_client_internal as supernode_loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    patch(supernode_loop, cap)
    flower_supernode()


if __name__ == "__main__":
    main()
