"""Long polls: a server that holds a poll it has nothing for until something arrives.

Flower's runtime moves messages by polling: each SuperNode asks the SuperLink for messages, each
node's SuperExec asks its SuperNode for tasks, the ServerApp asks the SuperLink for replies. However
well a poller guesses when to ask (``server_app/waits.py``), a message waits for the next ask. Where
the launcher starts the server too (``launch/superlink.py``, ``launch/supernode.py``), the server's
handler for that ask holds an empty answer for up to ``hold`` seconds and answers as soon as a
:class:`Bell` says something arrived — an in-process wake-up, no request — so a message is picked
up milliseconds after it is stored, and an idle poller costs one request per ``hold``.

A held request occupies one of the server's worker threads (FastAPI runs these handlers in a pool
of 40); at most ``slots`` are held at once, and a poll beyond them is answered at once, as Flower
does. The poller notices a held poll by its length (:data:`HELD_ABOVE`) and asks again at once
instead of sleeping (``launch/polling.py``, ``server_app/loop.py``); against a server that does not
hold, its own waits apply as before."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from google.protobuf.message import Message

from server_app.waits import HELD_ABOVE

__all__ = [
    "DEFAULT_HOLD", "HELD_ABOVE", "Bell", "after", "held", "hold_option", "hold_until_rung", "ring_after",
]  # fmt: skip

#: how long a server holds an empty poll (the launchers' default; ``--hold`` sets it)
DEFAULT_HOLD = 1.0

Response = TypeVar("Response")


class Bell:
    """Rings when something a held poll may be waiting for arrives (a message was stored)."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.rings = 0

    def ring(self) -> None:
        with self.condition:
            self.rings += 1
            self.condition.notify_all()

    def count(self) -> int:
        with self.condition:
            return self.rings

    def wait_past(self, seen: int, timeout: float) -> None:
        """Until the bell has rung since it had rung ``seen`` times, or ``timeout`` seconds."""
        with self.condition:
            self.condition.wait_for(lambda: self.rings != seen, timeout)


def held(
    handler: Callable[..., Response],
    bell: Bell,
    hold: float,
    is_empty: Callable[[Response], bool],
    slots: threading.BoundedSemaphore,
    may_hold: Callable[..., bool] = lambda *_, **__: True,
) -> Callable[..., Response]:
    """``handler``, except that an empty answer to a request that ``may_hold`` accepts (called
    with the handler's arguments) is held for up to ``hold`` seconds: the handler runs again
    whenever ``bell`` rings, and its first non-empty answer is returned."""

    @functools.wraps(handler)
    def holding(*args: Any, **kwargs: Any) -> Response:
        seen = bell.count()  # before the look-up: a ring between the two is not missed
        response = handler(*args, **kwargs)
        if not is_empty(response) or not may_hold(*args, **kwargs) or not slots.acquire(blocking=False):
            return response
        try:
            deadline = time.monotonic() + hold
            while is_empty(response) and (left := deadline - time.monotonic()) > 0:
                bell.wait_past(seen, left)
                seen = bell.count()
                response = handler(*args, **kwargs)
        finally:
            slots.release()
        return response

    return holding


def after(function: Callable[..., Response], then: Callable[[Response], None]) -> Callable[..., Response]:
    """``function``, then ``then(its result)``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        result = function(*args, **kwargs)
        then(result)
        return result

    return wrapper


def hold_until_rung(
    handler: tuple[ModuleType, str], bell: Bell, hold: float, field: str, slots: int,
    may_hold: Callable[..., bool] = lambda *_, **__: True,
) -> None:  # fmt: skip
    """``module.name`` (a handler answering a protobuf message) holds an answer whose ``field`` is
    empty until ``bell`` rings; at most ``slots`` at once, only requests ``may_hold`` accepts."""
    module, name = handler

    def is_empty(response: Any) -> bool:
        value = getattr(response, field)
        return not (response.HasField(field) if isinstance(value, Message) else value)

    semaphore = threading.BoundedSemaphore(slots)
    setattr(module, name, held(getattr(module, name), bell, hold, is_empty, semaphore, may_hold))


def ring_after(handler: tuple[ModuleType, str], bell: Bell) -> None:
    """``module.name`` rings ``bell`` after each call."""
    module, name = handler
    setattr(module, name, after(getattr(module, name), lambda _: bell.ring()))


#: the longest hold: well inside Flower's 30 s request timeout (a poller that gave up on a held
#: request would lose what it was answered with), and what a server's shutdown may wait for
LONGEST_HOLD = 5.0


def hold_option(value: float | None) -> float:
    """``--hold S``'s value (None: :data:`DEFAULT_HOLD`; 0: do not hold). A shorter hold than
    :data:`HELD_ABOVE` would not be recognised as one by the pollers."""
    hold = DEFAULT_HOLD if value is None else value
    if hold != 0 and not HELD_ABOVE <= hold <= LONGEST_HOLD:
        bounds = f"[{HELD_ABOVE:g}, {LONGEST_HOLD:g}]"
        raise SystemExit(f"--hold must be 0 or within {bounds} seconds, got {hold:g}")
    return hold
