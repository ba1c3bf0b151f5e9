"""Echo rounds: the ServerApp sends every node a synthetic payload of ``arrays`` float32 arrays,
``payload-mb`` in all (packed in FedSubspace's wire format, or one Flower Array each); each node's
ClientApp unpacks it and sends it back; the ServerApp checks the echo bit for bit and records the
round's seconds. Then the same bytes over a plain TCP socket between the same two hosts: the
ServerApp listens, tells each node (a QUERY message) where, and the node's ClientApp connects,
reads the bytes and sends them back; the ServerApp times it from its first byte sent."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire
from server_app.loop import exchange
from server_app.waits import retry_missing_objects_sooner

server = ServerApp()
client = ClientApp()


def payload(megabytes: float, arrays: int, seed: int) -> dict[str, np.ndarray]:
    """``arrays`` float32 arrays of about equal size, ``megabytes`` (10^6 bytes) in all."""
    size = max(int(megabytes * 1e6 / 4 / arrays), 1)
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.lora": rng.standard_normal(size, dtype=np.float32) for i in range(arrays)}


def encode(state: dict[str, np.ndarray], packed: bool) -> ArrayRecord:
    return to_wire(state) if packed else to_record(state)


def decode(record: ArrayRecord, packed: bool) -> dict[str, np.ndarray]:
    return from_wire(record) if packed else from_record(record)


def key(packed: bool) -> str:
    """Packed arrays travel under the app's own key, which its message loop unpacks on receipt;
    unpacked ones under another, which it leaves alone."""
    return "arrays" if packed else "plain"


def receive_exactly(connection: socket.socket, nbytes: int) -> bytearray:
    buffer = bytearray(nbytes)
    view, got = memoryview(buffer), 0
    while got < nbytes:
        got += connection.recv_into(view[got:], nbytes - got)
    return buffer


@client.train()
def echo(message: Message, context: Context) -> Message:
    packed = bool(message.content.config_records["probe"]["packed"])
    arrays = decode(message.content.array_records[key(packed)], packed)
    return Message(RecordDict({key(packed): encode(arrays, packed)}), reply_to=message)


@client.query()
def echo_socket(message: Message, context: Context) -> Message:
    """Connect to the first of the server's addresses that answers; echo ``nbytes``."""
    config = message.content.config_records["socket"]
    port, nbytes = int(config["port"]), int(config["nbytes"])  # type: ignore[arg-type]
    for address in [str(a) for a in config["addresses"]]:  # type: ignore[union-attr]
        try:
            connection = socket.create_connection((address, port), timeout=2.0)
        except OSError:
            continue
        with connection:
            connection.settimeout(None)
            connection.sendall(receive_exactly(connection, nbytes))
        return Message(RecordDict({"socket": ConfigRecord({"address": address})}), reply_to=message)
    raise ConnectionError(f"no server address answered on port {port}")


def socket_round_trips(grid: Grid, nodes: list[int], nbytes: int) -> list[float]:
    """Seconds per node for ``nbytes`` to the node and back over a plain TCP connection."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    addresses = [
        a.address for links in psutil.net_if_addrs().values() for a in links if a.family == socket.AF_INET
    ]
    data, seconds = bytes(nbytes), []

    def serve() -> None:
        for _ in nodes:
            connection, _ = listener.accept()
            with connection:
                start = time.perf_counter()
                connection.sendall(data)
                receive_exactly(connection, nbytes)
                seconds.append(time.perf_counter() - start)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    for node in nodes:  # one at a time: each has the link to itself
        config = ConfigRecord({"port": port, "nbytes": nbytes, "addresses": addresses})
        query = Message(RecordDict({"socket": config}), dst_node_id=node, message_type=MessageType.QUERY)
        (reply,) = grid.send_and_receive([query], timeout=600)
        if reply.has_error():
            raise RuntimeError(f"node {node}: {reply.error}")
    worker.join(timeout=600)
    listener.close()
    return seconds


@server.main()
def main(grid: Grid, context: Context) -> None:
    retry_missing_objects_sooner()
    config = context.run_config
    packed, rounds, out = bool(config["packed"]), int(config["rounds"]), str(config["out"])
    state = payload(float(config["payload-mb"]), int(config["arrays"]), seed=0)
    nbytes = int(sum(a.nbytes for a in state.values()))
    nodes: list[int] = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.1)
    rows = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        content = RecordDict({key(packed): encode(state, packed), "probe": ConfigRecord({"packed": packed})})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        replies = exchange(grid, messages, timeout=3600)  # FedSubspace's loop: its polling, its unpacking
        seconds = time.perf_counter() - start
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error}")
            echoed = from_record(reply.content.array_records[key(packed)])  # unpacked on receipt
            assert all(np.array_equal(echoed[k], v) for k, v in state.items()), "the echo differs"
        rows.append({"round": server_round, "seconds": seconds})
    result = {
        "nodes": len(nodes), "packed": packed, "payload_bytes": nbytes, "arrays": len(state), "rounds": rows,
        "socket_seconds": [socket_round_trips(grid, nodes, nbytes) for _ in range(3)],
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "w") as handle:
            json.dump(result, handle)
