"""A Grid stand-in that answers train messages in-process, for strategy and loop tests."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from server_app.inprocess import InProcessGrid as FakeGrid
from server_app.inprocess import Responder, outside_an_app

outside_an_app()  # tests build messages before any grid exists

__all__ = ["FakeGrid", "Responder", "client_upload", "engine", "real_clients"]


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
