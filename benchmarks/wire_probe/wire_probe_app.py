"""Echo rounds: the ServerApp sends every node a synthetic payload of ``arrays`` float32 arrays,
``payload-mb`` in all (packed in FedSubspace's wire format, or one Flower Array each); each node's
ClientApp unpacks it and sends it back; the ServerApp checks the echo bit for bit and records the
round's seconds."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire

server, client = ServerApp(), ClientApp()


def payload(megabytes: float, arrays: int, seed: int) -> dict[str, np.ndarray]:
    """``arrays`` float32 arrays of about equal size, ``megabytes`` (10^6 bytes) in all."""
    size = max(int(megabytes * 1e6 / 4 / arrays), 1)
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.lora": rng.standard_normal(size, dtype=np.float32) for i in range(arrays)}


def encode(state: dict[str, np.ndarray], packed: bool) -> ArrayRecord:
    return to_wire(state) if packed else to_record(state)


def decode(record: ArrayRecord, packed: bool) -> dict[str, np.ndarray]:
    return from_wire(record) if packed else from_record(record)


@client.train()
def echo(message: Message, context: Context) -> Message:
    packed = bool(message.content.config_records["probe"]["packed"])
    arrays = decode(message.content.array_records["arrays"], packed)
    return Message(RecordDict({"arrays": encode(arrays, packed)}), reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    packed, rounds, out = bool(config["packed"]), int(config["rounds"]), str(config["out"])
    state = payload(float(config["payload-mb"]), int(config["arrays"]), seed=0)
    nodes: list[int] = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.1)
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        content = RecordDict({"arrays": encode(state, packed), "probe": ConfigRecord({"packed": packed})})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        replies = list(grid.send_and_receive(messages, timeout=3600))
        seconds = time.perf_counter() - start
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error}")
            echoed = decode(reply.content.array_records["arrays"], packed)
            assert all(np.array_equal(echoed[k], v) for k, v in state.items()), "the echo differs"
        row = {"round": server_round, "seconds": seconds, "nodes": len(nodes), "packed": packed,
               "payload_bytes": int(sum(a.nbytes for a in state.values())), "arrays": len(state)}  # fmt: skip
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
