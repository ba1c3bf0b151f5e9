"""``flower-superlink`` that holds an empty pull for messages or replies (``fedsubspace-superlink``).

Flower's SuperLink answers a SuperNode's ask for messages at once, message or not; the node then
waits before asking again (Flower's: 3 s; ``fedsubspace-supernode``'s: a learned wait), so a round
starts on each node at its next ask. Here a pull that finds nothing is held for up to ``--hold``
seconds (default 1; 0: Flower's behaviour) and answered the moment the ServerApp pushes messages
(``launch/long_poll.py``): every node gets its message milliseconds after the ServerApp sent it.
Likewise a ServerApp's pull for replies that finds none is held until a node pushes one, and the
SuperExec's ask for a run to start until one is started. Everything else is Flower's SuperLink
unchanged.

    fedsubspace-superlink --hold 1 --insecure ...   # + flower-superlink flags
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from launch.long_poll import Bell, hold_option, hold_until_rung, ring_after
from launch.supernode import take_option

#: empty pulls held at once (the SuperLink's request threads: 40); more nodes poll as in Flower
HELD_PULLS = 16
HELD_OTHERS = 4  # a ServerApp's pulls for its replies, the SuperExec's asks for a run to start


def patch(fleet: ModuleType, runtime: ModuleType, control: ModuleType, hold: float) -> None:
    """Hold an empty pull until what it waits for arrives: a node's pull (Flower's Fleet handlers,
    ``fleet``) until a ServerApp pushes messages, a ServerApp's pull for replies (the Runtime API's
    handlers, ``runtime``) until a node pushes one, the SuperExec's ask for a task until a run is
    started (the Control API's handlers, ``control``). A task created otherwise (an automation, a
    task's child task) waits for the hold's end, then the SuperExec's own poll."""
    if hold <= 0:
        return
    messages, replies, runs = Bell(), Bell(), Bell()
    hold_until_rung((fleet, "pull_messages"), messages, hold, "messages_list", HELD_PULLS)
    ring_after((runtime, "push_messages"), messages)
    hold_until_rung((runtime, "pull_messages"), replies, hold, "messages_list", HELD_OTHERS)
    ring_after((fleet, "push_messages"), replies)
    hold_until_rung((runtime, "acquire_task"), runs, hold, "task", HELD_OTHERS, may_hold=can_take_a_task)
    ring_after((control, "start_run"), runs)


def can_take_a_task(request: Any, *_: Any) -> bool:
    """A SuperExec at capacity asks for no kind of task: its ask is answered at once, as in Flower,
    so that its loop notices freed capacity without waiting out a hold."""
    return bool(request.supported_task_types or request.agentapp_fab_hashes)


def main() -> None:
    value, sys.argv[1:] = take_option(sys.argv[1:], "--hold")
    hold = hold_option(value)
    from launch.flower_contract import require

    require()
    import flwr.superlink.servicer.control.control_handlers as control
    import flwr.superlink.servicer.fleet.fleet_handlers as fleet
    import flwr.superlink.servicer.runtime.runtime_handlers as runtime
    from flwr.superlink.cli.flower_superlink import flower_superlink

    patch(fleet, runtime, control, hold)
    flower_superlink()


if __name__ == "__main__":
    main()
