"""The wire format of a message's arrays: every Array of a record packed into one (a manifest and
the arrays' serialized bytes back to back), so that a message moves as few objects as Flower
allows, whatever the number of arrays (an LLM adapter has hundreds). Packing keeps each array's
serialized bytes as they are, so unpacking gives back bit-identical Arrays; it happens at the
message boundaries only (the engine's messages, the ClientApp's replies, the server loop's
receipt), so every rule, central DP's clipping and the checkpoints see plain records.

A peer that speaks another format is refused with a message that names both versions."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from experiment_schema import ConfigError
from finetune.records import from_record, to_record

WIRE_FORMAT = 1
#: The one Array of a packed record. Its name says what an older peer, which reads it as an
#: array it does not know, should do.
PREFIX = "fedsubspace wire format "
PACKED_KEY = f"{PREFIX}{WIRE_FORMAT}: packed arrays (a peer that cannot read them must upgrade)"
_LENGTH = struct.Struct("<Q")


class WireFormatError(ConfigError):
    """The peer packs its arrays another way (an older or newer FedSubspace)."""


def manifest(record: ArrayRecord) -> bytes:
    """What a packed record holds, in order: key, dtype, shape, serialization type, length."""
    entries = [[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in record.items()]
    return json.dumps({"format": WIRE_FORMAT, "arrays": entries}, separators=(",", ":")).encode()


def pack(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one Array: an 8-byte manifest length, the manifest, every Array's bytes —
    serialized as ``Array(np.frombuffer(those bytes, uint8))`` would be, in one copy."""
    head = manifest(record)
    parts = [_LENGTH.pack(len(head)), head, *(a.data for a in record.values())]
    total = sum(len(part) for part in parts)
    data = b"".join([npy_header(total), *parts])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(total,), stype=SType.NUMPY, data=data)})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The plain record a peer packed; :class:`WireFormatError` for any other format."""
    if PACKED_KEY not in record:
        other = next((k for k in record if k.startswith(PREFIX)), None)
        theirs = other.split(":")[0].removeprefix(PREFIX) if other else "0 (one array at a time)"
        raise WireFormatError(
            f"the peer sent arrays in wire format {theirs}; this side speaks wire format {WIRE_FORMAT}: "
            "run the same FedSubspace version on the server and the nodes"
        )
    buffer = packed_buffer(record[PACKED_KEY])
    (length,) = _LENGTH.unpack_from(buffer)
    head = json.loads(bytes(buffer[_LENGTH.size : _LENGTH.size + length]))
    offset, out = _LENGTH.size + length, ArrayRecord()
    for key, dtype, shape, stype, size in head["arrays"]:
        out[key] = Array(dtype, tuple(shape), stype, bytes(buffer[offset : offset + size]))
        offset += size
    return out


def npy_header(nbytes: int) -> bytes:
    """The ``.npy`` header of a 1-D uint8 array of ``nbytes`` (what ``np.save`` writes first)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (nbytes,)})
    return header.getvalue()


def packed_buffer(array: Array) -> memoryview:
    """The packed bytes of ``array`` (a 1-D uint8 ``.npy``), without copying them."""
    data = memoryview(array.data)
    if array.dtype != "uint8" or len(array.shape) != 1 or bytes(data[:6]) != b"\x93NUMPY":
        return array.numpy().data.cast("B")  # not as pack() writes it: let numpy read it
    major = data[6]
    size_format = "<H" if major == 1 else "<I"
    (header_length,) = struct.unpack_from(size_format, data, 8)
    start = 8 + struct.calcsize(size_format) + header_length
    if len(data) < start + array.shape[0]:
        raise WireFormatError(
            f"the packed arrays are cut short: {len(data) - start} of {array.shape[0]} bytes arrived"
        )
    return data[start : start + array.shape[0]]


def packed_bytes(record: ArrayRecord) -> int:
    """``pack(record).count_bytes()``, from the record's sizes alone (no copy): what the record
    occupies on the wire."""
    total = _LENGTH.size + len(manifest(record)) + sum(len(a.data) for a in record.values())
    return len(PACKED_KEY) + len(npy_header(total)) + total


def to_wire(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """``state`` as a message carries it: packed, floating arrays in the wire dtype."""
    return pack(to_record(state, wire_dtype))


def from_wire(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a packed record (floating ones as float32)."""
    return from_record(unpack(record))
