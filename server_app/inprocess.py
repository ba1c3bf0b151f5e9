"""A Grid that answers messages in-process: the server's messages are handed to a responder (the
real ClientApp handlers, or a synthetic node) and its answers come back as replies. For tests and
benchmarks that exercise the ServerApp's side without a SuperLink."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def outside_an_app() -> None:
    """Let Message() exist outside a running app (it refuses unless a task identity is set); a
    running app's own identity is left alone."""
    if TaskIdentity._run_id is None:  # the getter raises while it is unset
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


Responder = Callable[[Message], RecordDict | Error | None]  # None: the node never answers


class InProcessGrid:
    """Nodes ``node_ids`` (registered in that order), each message answered by ``respond``."""

    def __init__(self, node_ids: Iterable[int], respond: Responder) -> None:
        outside_an_app()
        self.node_ids = list(node_ids)
        self.respond = respond
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def get_nodes(self) -> list[SimpleNamespace]:
        """Registered in the order given (as a simulation registers partition 0, 1, ...)."""
        return [
            SimpleNamespace(node_id=n, registered_at=f"2026-12-01T00:00:00.{i:06d}")
            for i, n in enumerate(self.node_ids)
        ]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"msg-{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            answer = self.respond(message)
            if answer is not None:
                self._replies[message_id] = Message(answer, reply_to=message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages(ids)
