"""Flower's node-side poll loops on :class:`server_app.waits.Poll`: a stand-in for the ``time``
module of a loop whose sleeps the node runtime replaces (the SuperNode's, ``launch/supernode.py``;
the SuperExec's, ``launch/warm_node.py``)."""

from __future__ import annotations

import time
from typing import Any

from server_app.waits import HELD_ABOVE, OBJECT_RETRY, Poll

__all__ = ["OBJECT_RETRY", "SUPEREXEC_TASK_POLL_ENV", "Poll", "PollingTime"]

#: Flower's SuperExec looks for tasks every this many seconds (its default: 1 s)
SUPEREXEC_TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class PollingTime:
    """The ``time`` module, except ``sleep``: a sleep of ``idle_above`` seconds or more (the loop
    found nothing to do) becomes ``poll``'s next wait — none at all when the loop's pass since its
    last sleep took :data:`HELD_ABOVE` or more (its server held the poll: ``launch/long_poll.py``);
    a shorter one (waiting on something in the loop's own process, e.g. a reply its ClientApp is
    about to hand in) is capped at ``short``."""

    def __init__(self, poll: Poll, idle_above: float, short: float) -> None:
        self.poll, self.idle_above, self.short = poll, idle_above, short
        self.awake_since = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds < self.idle_above:
            time.sleep(min(seconds, self.short))
        elif not self.was_held():
            self.poll.wait()
        self.awake_since = time.monotonic()

    def was_held(self) -> bool:
        """The loop's pass since its last sleep took long enough to have been a held poll."""
        return time.monotonic() - self.awake_since >= HELD_ABOVE

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)
