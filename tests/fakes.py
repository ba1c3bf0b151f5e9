"""A Grid stand-in that answers train messages in-process, for strategy and loop tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

# Message() refuses to exist outside a running app unless the task identity is set.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 1
TaskIdentity.task_id = 1

Responder = Callable[[Message], RecordDict | Error | None]  # None: the node never answers


class FakeGrid:
    def __init__(self, node_ids: Iterable[int], respond: Responder) -> None:
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


def engine(
    rule_type, method=None, min_replies=1, evaluate_on_clients=None, bound=None, robust=None, **sampling
):
    """The engine around a rule's server half, as a ServerApp builds it (the sampling settings of
    ``strategies.nodes.NodeDirectory`` as keyword arguments: fraction_train, min_train_nodes, seed, ...)."""
    from strategies.engine import Engine
    from strategies.nodes import NodeDirectory

    nodes = NodeDirectory(ranked=rule_type.heterogeneous_ranks, **sampling)
    return Engine(
        rule_type(method, nodes),
        min_replies=min_replies,
        evaluate_on_clients=evaluate_on_clients,
        bound=bound,
        robust=robust,
    )


def real_clients(partitions: dict[int, int]) -> Responder:
    """Nodes (node id → partition id) served by the real ClientApp functions in this process, each
    with its own Context, as a SuperNode keeps one per run."""
    from flwr.app import Context

    from client_app.app import query, setup, train

    handlers = {"query": query, "query.setup": setup, "train": train}
    contexts = {
        node: Context(
            run_id=1, node_id=node, node_config={"partition-id": p, "num-partitions": len(partitions)},
            state=RecordDict(), run_config={},
        )
        for node, p in partitions.items()
    }  # fmt: skip

    def respond(message: Message) -> RecordDict:
        handler = handlers[message.metadata.message_type]
        return handler(message, contexts[message.metadata.dst_node_id]).content

    return respond


def client_upload(cfg, server_round: int, trained: dict) -> dict:
    """What the client half of ``cfg``'s rule sends up after a round in which it trained
    ``trained`` (its whole trainable state): ``ClientRule.finish``, called as the ClientApp calls it."""
    from strategies import get_rule
    from strategies.client import ClientRound, NodeState
    from strategies.protocol import Instruction, TrainReport

    job = ClientRound(cfg, Instruction("", server_round=server_round), 0, NodeState(RecordDict()))
    report = TrainReport(
        num_examples=1, examples_seen=1, train_loss=0.0, train_seconds=0.0, samples_per_second=0.0,
        peak_memory_mb=0.0, partition_id=0, optimizer_state_bytes=0,
    )  # fmt: skip
    return get_rule(cfg.method.name).build_client(job).finish(None, trained, report)  # type: ignore[arg-type]  # no model: rules whose finish reads it are not asked
