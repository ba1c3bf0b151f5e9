"""``flower-supernode`` with waits that follow the traffic (``fedsubspace-supernode``).

Flower's SuperNode sleeps a fixed 3 s whenever it asks the SuperLink for a message and none is
waiting, 0.5 s between checks for its ClientApp's reply, and 1 s, 2 s, ... before asking again for
a message object the SuperLink does not hold yet. Between rounds the server aggregates and
evaluates, so a node usually finds nothing and sleeps: each node then starts the next round up to
3 s late, at a different moment from the others, and the round waits for the latest. This entry
point runs Flower's own SuperNode unchanged except for those waits: the idle poll waits at most
``--idle-poll`` seconds (default 0.5) at a time, and from the moment the next message is due — as
long after its reply as the shortest of the last ones came — polls often (``server_app/waits.py``;
with no history, from 10 ms up); the reply
check runs every 20 ms (an in-process look-up), and a missing object is asked for again after
10–50 ms. The cost while idle is about one small request to the SuperLink per node every
``--idle-poll`` seconds.

    fedsubspace-supernode --idle-poll 0.5 --superlink ... --isolation process ...  # + flower-supernode flags
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from launch.polling import OBJECT_RETRY, Poll, PollingTime

DEFAULT_IDLE_POLL = 0.5
FIRST_IDLE_POLL = 0.01  # from the moment the next message is due (or right after a reply: no history)
REPLY_CHECK = 0.02  # seconds between checks for the ClientApp's reply (in the SuperNode's memory)


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


def after(function: Callable[..., Any], then: Callable[[Any], None]) -> Callable[..., Any]:
    """``function``, then ``then(its result)``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        then(result)
        return result

    return wrapper


def patch(module: ModuleType, cap: float) -> Poll:
    """Flower's SuperNode loop (``module``) with the waits above; returns the idle poll. A pulled
    message (``_pull_and_store_message`` returns its run id) is an arrival; once the reply is pushed
    (``_push_messages`` returns) the next quiet spell begins."""
    poll = Poll(min(FIRST_IDLE_POLL, cap), cap)
    module.time = PollingTime(poll, idle_above=1.0, short=REPLY_CHECK)  # type: ignore[attr-defined]
    module._pull_and_store_message = after(  # type: ignore[attr-defined]
        module._pull_and_store_message, lambda run_id: poll.arrived() if run_id is not None else None
    )
    module._push_messages = after(module._push_messages, lambda _: poll.start())  # type: ignore[attr-defined]
    first, longest = OBJECT_RETRY
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        module.pull_objects, initial_backoff=first, backoff_cap=longest
    )
    return poll


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
