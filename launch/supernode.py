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
``--idle-poll`` seconds. Against a SuperLink that holds an empty pull (``fedsubspace-superlink``,
``launch/long_poll.py``) the node asks again at once after each held pull instead.

The node's Runtime API likewise holds its SuperExec's empty ask for a task for up to ``--hold``
seconds (default 1; 0: Flower's behaviour), until a pulled message's task is stored.

``--heartbeat-interval S`` (10–1800 s; Flower's is 30) is the heartbeat period the node declares:
the SuperLink declares a silent node unavailable after twice that, so a round stops waiting for a
dead node after 20 s instead of a minute, at one more small request every few seconds.

    fedsubspace-supernode --idle-poll 0.5 --hold 1 --heartbeat-interval 10 --superlink ...
    # + flower-supernode flags
"""

from __future__ import annotations

import argparse
import functools
import sys
from types import ModuleType

from launch.long_poll import Bell, after, hold_option, hold_until_rung
from launch.polling import OBJECT_RETRY, Poll, PollingTime

DEFAULT_IDLE_POLL = 0.5
FIRST_IDLE_POLL = 0.01  # from the moment the next message is due (or right after a reply: no history)
REPLY_CHECK = 0.02  # seconds between checks for the ClientApp's reply (in the SuperNode's memory)
HELD_TASK_POLLS = 4  # the node's SuperExec asks for tasks one at a time


#: what Flower's SuperLink accepts (flwr.common.constant's HEARTBEAT_MIN/MAX_INTERVAL)
HEARTBEAT_RANGE = (10.0, 1800.0)


def take_option(argv: list[str], flag: str) -> tuple[float | None, list[str]]:
    """``flag S`` (or ``flag=S``) out of the SuperNode's arguments: its value (None if absent)
    and the arguments left for Flower."""
    rest, value = [], None
    items = iter(argv)
    for item in items:
        if item == flag:
            given = next(items, "")
        elif item.startswith(f"{flag}="):
            given = item.split("=", 1)[1]
        else:
            rest.append(item)
            continue
        try:
            value = float(given)
        except ValueError:
            raise SystemExit(f"{flag} takes seconds, got {given!r}") from None
    return value, rest


def idle_poll(argv: list[str]) -> tuple[float, list[str]]:
    """``--idle-poll S`` out of the SuperNode's arguments (default 0.5 s)."""
    cap, rest = take_option(argv, "--idle-poll")
    cap = DEFAULT_IDLE_POLL if cap is None else cap
    if not cap > 0:
        raise SystemExit(f"--idle-poll must be > 0 seconds, got {cap}")
    return cap, rest


def heartbeat_interval(argv: list[str]) -> tuple[float | None, list[str]]:
    """``--heartbeat-interval S`` out of the SuperNode's arguments (None: Flower's)."""
    interval, rest = take_option(argv, "--heartbeat-interval")
    if interval is not None and (problem := heartbeat_problem(interval)):
        raise SystemExit(problem)
    return interval, rest


def heartbeat_problem(seconds: float) -> str | None:
    """Why the SuperLink would refuse ``seconds`` as a heartbeat interval (None: it accepts it)."""
    low, high = HEARTBEAT_RANGE
    if low <= seconds <= high:
        return None
    return f"--heartbeat-interval must be within [{low:g}, {high:g}] seconds, got {seconds:g}"


def add_heartbeat_option(parser: argparse.ArgumentParser) -> None:
    """``--heartbeat-interval`` for the launchers that start warm SuperNodes."""
    parser.add_argument(
        "--heartbeat-interval", type=heartbeat_seconds, default=0.0,
        help="seconds between a node's heartbeats, 10-1800 (Flower: 30); the SuperLink declares a "
        "silent node unavailable after twice this",
    )  # fmt: skip


def heartbeat_seconds(text: str) -> float:
    """``--heartbeat-interval``'s argparse type (0: Flower's default)."""
    seconds = float(text)
    if seconds and (problem := heartbeat_problem(seconds)):
        raise argparse.ArgumentTypeError(problem)
    return seconds


def set_heartbeat_interval(seconds: float) -> None:
    """The node declares ``seconds`` to the SuperLink and sends its heartbeats by it."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection

    connection.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[assignment]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[assignment]


def patch(module: ModuleType, cap: float, tasks: Bell | None = None) -> Poll:
    """Flower's SuperNode loop (``module``) with the waits above; returns the idle poll. A pulled
    message (``_pull_and_store_message`` returns its run id) is an arrival, and rings ``tasks``
    (its task is stored); once the reply is pushed (``_push_messages`` returns) the next quiet
    spell begins."""
    poll = Poll(min(FIRST_IDLE_POLL, cap), cap)
    module.time = PollingTime(poll, idle_above=1.0, short=REPLY_CHECK)  # type: ignore[attr-defined]

    def pulled(run_id: int | None) -> None:
        if run_id is not None:
            poll.arrived()
            if tasks is not None:
                tasks.ring()

    module._pull_and_store_message = after(module._pull_and_store_message, pulled)  # type: ignore[attr-defined]
    module._push_messages = after(module._push_messages, lambda _: poll.start())  # type: ignore[attr-defined]
    first, longest = OBJECT_RETRY
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        module.pull_objects, initial_backoff=first, backoff_cap=longest
    )
    return poll


def hold_task_polls(runtime: ModuleType, hold: float) -> Bell:
    """The node's Runtime API (Flower's handlers, ``runtime``) holds its SuperExec's empty ask for
    a task up to ``hold`` seconds, until the bell returned rings (a message's task was stored).
    Only an ask that can take a ClientApp task is held: a SuperExec whose worker is busy asks
    without that kind, and must stay free to ask again the moment its worker is done."""
    from flwr.supercore.constant import TaskType

    bell = Bell()
    if hold > 0:
        hold_until_rung(
            (runtime, "acquire_task"), bell, hold, "task", HELD_TASK_POLLS,
            may_hold=lambda request, *_: TaskType.CLIENT_APP in request.supported_task_types,
        )  # fmt: skip
    return bell


def main() -> None:
    cap, rest = idle_poll(sys.argv[1:])
    interval, rest = heartbeat_interval(rest)
    value, sys.argv[1:] = take_option(rest, "--hold")
    hold = hold_option(value)
    from launch.flower_contract import require

    require()
    import flwr.supernode.servicer.runtime.runtime_handlers as runtime
    import flwr.supernode.start_client_internal as supernode_loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    patch(supernode_loop, cap, hold_task_polls(runtime, hold))
    if interval is not None:
        set_heartbeat_interval(interval)
    flower_supernode()


if __name__ == "__main__":
    main()
