"""The waits of a deployed round: how soon a poll asks again, and how soon a missing object is
asked for again.

Flower's deployed runtime moves messages by polling — the ServerApp asks the SuperLink for replies,
each SuperNode asks it for messages, each node's SuperExec asks its SuperNode for tasks — with
fixed sleeps (3 s, 3 s, 1 s) that a quick round spends mostly waiting, while a fixed short sleep
would cost a request every few milliseconds per process for as long as a run lasts. A
:class:`Poll` learns when its next arrival is due: a federation's rounds repeat, so the quiet spell
before a node's next message (the server aggregating and evaluating) or before the server's last
reply (the clients training) lasts about as long as the last ones (the shortest of the last three
is taken). It waits up to ``cap`` at a time
until ``lead`` of that expected spell has passed, then polls every ``precision`` of it (e.g. every
0.1 s for a 5 s spell), more sparsely as an arrival runs late (at most a fifth of the lateness so
far), never shorter than ``floor`` nor longer than ``cap``. With nothing to go on (the first round)
it polls from ``floor``, growing by ``growth`` per empty poll to ``cap``. Early arrivals are seen at
most ``cap`` late, due ones within ``precision`` of the spell, at the cost of about ``(1 - lead) /
precision`` more polls a spell than polling every ``cap``.

This module serves the ServerApp's message loop (``server_app/loop.py``) and the node runtime the
launcher starts (``launch/supernode.py``, ``launch/warm_node.py``, through ``launch/polling.py``).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable

# A message object its holder does not have yet (Flower lists a message before its objects have all
# arrived): the first and the longest wait before asking again. Flower waits 1 s, 2 s, ... up to
# 10 s; each retry here is one small request to a process on the same host or link.
OBJECT_RETRY = (0.01, 0.05)
#: a poll that took at least this long was held by its server (a long poll, ``launch/long_poll.py``):
#: the poller asks again at once instead of waiting
HELD_ABOVE = 0.5
LATE_FRACTION = 0.2  # past the due time, a poll waits at most this fraction of the lateness so far
SPELLS_REMEMBERED = 3


class Poll:
    """The next wait of a poll loop; see the module's docstring."""

    def __init__(
        self,
        floor: float,
        cap: float,
        growth: float = 1.5,
        lead: float = 0.8,
        precision: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < floor <= cap:
            raise ValueError(f"a poll needs 0 < floor <= cap, got floor {floor}, cap {cap}")
        if growth < 1:
            raise ValueError(f"a poll's wait cannot shrink (growth {growth} < 1)")
        if not (0 <= lead <= 1 and 0 < precision <= 1):
            raise ValueError(f"a poll's lead and precision are fractions of a spell, got {lead}, {precision}")
        self.floor, self.cap, self.growth, self.lead, self.clock = floor, cap, growth, lead, clock
        self.precision = precision
        self.current = floor
        self.quiet_since = self.last_poll = clock()
        self.in_spell = False  # the wait from the poller's start to its first arrival is no spell
        self.spells: collections.deque[float] = collections.deque(maxlen=SPELLS_REMEMBERED)
        self.lock = threading.Lock()

    def start(self) -> None:
        """A quiet spell begins now (a reply went out, a task ended, messages were sent)."""
        with self.lock:
            self.current, self.quiet_since = self.floor, self.clock()
            self.last_poll, self.in_spell = self.quiet_since, True

    def sooner(self) -> None:
        """Something arrived and more may follow at once: poll from ``floor`` again."""
        with self.lock:
            self.current = self.floor

    def arrived(self) -> None:
        """What the spell waited for came; the next spell is expected to last as long as the
        shortest of the last few (a node that finished last this round may finish first the next)."""
        with self.lock:  # it came between the last empty poll and now: count from the middle, since
            # counting from now would add this poll's own lateness to the next spell's due time
            if self.in_spell:
                self.spells.append((self.last_poll + self.clock()) / 2 - self.quiet_since)
            self.current = self.floor

    def next_wait(self) -> float:
        """The wait after an empty poll."""
        with self.lock:
            self.last_poll = self.clock()
            if not self.spells:  # nothing to go on: from the floor up
                wait, self.current = self.current, min(self.current * self.growth, self.cap)
                return wait
            expected = min(self.spells)
            past_due = self.clock() - self.quiet_since - self.lead * expected
            if past_due < 0:
                return max(min(-past_due, self.cap), self.floor)
            # due: every `precision` of the expected spell, sparser as the arrival runs late
            return min(max(self.precision * expected, LATE_FRACTION * past_due, self.floor), self.cap)

    def wait(self) -> None:
        time.sleep(self.next_wait())


def retry_missing_objects_sooner() -> None:
    """The ServerApp's deployed Grid (Flower's ``http_grid``) asks again for a reply's missing
    objects after ``OBJECT_RETRY`` instead of 1 s, 2 s, ...: Flower lists a reply as soon as the node
    has pushed the reply itself, which can be before its arrays have all arrived."""
    from flwr.superlink.grid import http_grid

    if isinstance(http_grid.pull_objects, functools.partial):  # already done in this process
        return
    first, longest = OBJECT_RETRY
    http_grid.pull_objects = functools.partial(
        http_grid.pull_objects, initial_backoff=first, backoff_cap=longest
    )
