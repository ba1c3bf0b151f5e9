"""The wire format: a record's arrays packed into one Array and back, bit for bit; the bytes it
occupies; peers that pack another way refused with both versions named."""

import numpy as np
import pytest
from fakes import FakeGrid, engine
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from finetune.records import from_record, to_record
from finetune.wire import PACKED_KEY, WireFormatError, from_wire, pack, packed_bytes, to_wire, unpack
from server_app.loop import exchange
from strategies.fedit import FedIT


def state(n: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {f"layer{i}.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32) for i in range(n)}
    return {**arrays, "head.bias": rng.standard_normal(3).astype(np.float32), "steps": np.arange(4)}


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_a_record_travels_as_one_array_and_comes_back_bit_for_bit(wire_dtype):
    record = to_record(state(), wire_dtype)
    packed = pack(record)
    assert list(packed) == [PACKED_KEY]  # one object on the wire, whatever the number of arrays
    back = unpack(packed)
    assert list(back) == list(record)
    for key, array in record.items():
        assert (back[key].dtype, back[key].shape, back[key].data) == (array.dtype, array.shape, array.data)
    plain, returned = from_record(record), from_record(back)
    assert all(np.array_equal(returned[key], value) for key, value in plain.items())


def test_the_packed_array_is_what_numpy_would_serialize_and_either_form_unpacks():
    """pack() writes the one Array in a single copy; its bytes are np.save's, so a peer reading
    it with Array.numpy() (as before this shortcut) gets the same bytes, and unpack() reads an
    Array that numpy serialized (another writer) as well as its own."""
    from flwr.app import Array

    record = to_record(state(), "float16")
    packed = pack(record)[PACKED_KEY]
    by_numpy = Array(packed.numpy())
    assert (packed.dtype, packed.shape, packed.stype, packed.data) == (
        by_numpy.dtype, by_numpy.shape, by_numpy.stype, by_numpy.data,
    )  # fmt: skip
    for form in (packed, by_numpy):
        back = unpack(ArrayRecord({PACKED_KEY: form}))
        assert all(back[key].data == array.data for key, array in record.items())


def test_unpacking_reads_other_npy_header_versions_and_refuses_cut_short_arrays():
    import io

    from flwr.app import Array

    record = to_record(state(3))
    packed = pack(record)[PACKED_KEY]
    payload = packed.numpy()
    version_2 = io.BytesIO()
    np.lib.format.write_array(version_2, payload, version=(2, 0))  # what another writer may send
    back = unpack(ArrayRecord({PACKED_KEY: Array("uint8", packed.shape, packed.stype, version_2.getvalue())}))
    assert all(back[key].data == array.data for key, array in record.items())
    cut = Array("uint8", packed.shape, packed.stype, packed.data[:-10])
    with pytest.raises(WireFormatError, match=r"cut short: \d+ of \d+ bytes arrived"):
        unpack(ArrayRecord({PACKED_KEY: cut}))


def test_the_packed_size_is_known_without_packing():
    record = to_record(state())
    assert packed_bytes(record) == pack(record).count_bytes()
    assert packed_bytes(ArrayRecord()) == pack(ArrayRecord()).count_bytes()


def test_a_peer_of_another_format_is_refused_with_both_versions_named():
    with pytest.raises(WireFormatError, match=r"wire format 0 .*this side speaks wire format 1"):
        unpack(to_record(state(2)))
    future = ArrayRecord({"fedsubspace wire format 2: packed arrays": pack(to_record(state(2)))[PACKED_KEY]})
    with pytest.raises(WireFormatError, match="wire format 2; this side speaks wire format 1"):
        unpack(future)


def test_a_reply_in_another_format_is_rejected_and_named_the_others_are_aggregated():
    global_state = {"lora_A": np.ones((2, 3), np.float32), "lora_B": np.zeros((4, 2), np.float32)}

    def respond(message):
        if message.metadata.message_type != "train":
            return RecordDict({"metrics": MetricRecord({"partition-id": message.metadata.dst_node_id - 1})})
        sent = from_wire(message.content.array_records["arrays"])
        old = message.metadata.dst_node_id == 3  # an older node: its arrays one by one
        arrays = to_record(sent) if old else to_wire(sent)
        return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})})

    grid = FakeGrid([1, 2, 3], respond)
    strategy = engine(FedIT, min_train_nodes=3)
    messages = list(strategy.configure_train(1, to_record(global_state), ConfigRecord({"lr": 0.1}), grid))
    strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))
    stats = strategy.rounds[1]
    assert sorted(stats.aggregated) == [1, 2]
    assert "WireFormatError" in stats.rejected[3] and "wire format 0" in stats.rejected[3]
