"""What travels each round, declared once per rule (on its server half, :class:`ServerRule`) and
read by both halves: the server expects exactly what the client uploads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def everything(key: str) -> bool:
    return True


def nothing(key: str) -> bool:
    return False


def any_round(server_round: int, key: str) -> bool:
    return True


def every_round(upload: Callable[[str], bool]) -> Callable[[int, str], bool]:
    """An upload rule that does not depend on the round."""

    def uploads(server_round: int, key: str) -> bool:
        return upload(key)

    uploads.__doc__ = upload.__doc__
    return uploads


@dataclass(frozen=True)
class Traffic:
    """``shares(key)``: the trainable array belongs to the global state (nodes receive it);
    ``uploads(round, key)``: a node sends this trained array up in that round (of what it was
    sent, the server expects exactly these); ``keeps(key)``: a node keeps this trained array for
    its next round instead of the server's."""

    shares: Callable[[str], bool] = everything
    uploads: Callable[[int, str], bool] = any_round
    keeps: Callable[[str], bool] = nothing
