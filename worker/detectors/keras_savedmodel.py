"""Reads what a Keras SavedModel holds without TensorFlow: the checkpoint variables
(``variables.index`` is a LevelDB-format table of BundleEntryProto records pointing into
``variables.data-*``) and the string-lookup vocabularies that are baked into
``saved_model.pb`` as graph constants. Only what LAION's AutoKeras heads need is
implemented: float32/int64 tensors, uncompressed tables, top-level graph constants.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator

import numpy as np

_TABLE_MAGIC = 0xDB4775248B80FB57
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 9: "<i8"}  # TensorFlow DataType enum → numpy
DT_STRING = 7


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Generic protobuf wire-format reader: (field number, value) pairs."""
    i, n = 0, len(buf)
    while i < n:
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 - 4 * restarts
    i, key = 0, b""
    while i < end:
        shared, i = _varint(block, i)
        unshared, i = _varint(block, i)
        size, i = _varint(block, i)
        key = key[:shared] + block[i : i + unshared]
        i += unshared
        yield key, block[i : i + size]
        i += size


def _table_entries(index: bytes) -> Iterator[tuple[bytes, bytes]]:
    footer = index[-48:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise ValueError("variables.index is not a TensorFlow tensor-bundle table")
    i = 0
    _, i = _varint(footer, i)  # metaindex handle: unused
    _, i = _varint(footer, i)
    index_offset, i = _varint(footer, i)
    index_size, i = _varint(footer, i)
    for _, handle in _block_entries(index[index_offset : index_offset + index_size]):
        offset, j = _varint(handle, 0)
        size, _ = _varint(handle, j)
        if index[offset + size] != 0:
            raise ValueError("compressed tensor-bundle blocks are not supported")
        yield from _block_entries(index[offset : offset + size])


def read_variables(index: bytes, data: bytes) -> dict[str, np.ndarray]:
    """Checkpoint variables (numeric dtypes) by their checkpoint key."""
    out: dict[str, np.ndarray] = {}
    for key, value in _table_entries(index):
        if not key:
            continue  # the bundle header
        dtype, offset, size, shape = 0, 0, 0, []
        for field, v in proto_fields(value):
            if field == 1:
                dtype = int(v)  # type: ignore[arg-type]
            elif field == 2:
                shape = [int(dict(proto_fields(d)).get(1, 0)) for f, d in proto_fields(v) if f == 2]  # type: ignore[arg-type]
            elif field == 4:
                offset = int(v)  # type: ignore[arg-type]
            elif field == 5:
                size = int(v)  # type: ignore[arg-type]
        if dtype in _DTYPES:
            out[key.decode()] = (
                np.frombuffer(data[offset : offset + size], _DTYPES[dtype]).reshape(shape).copy()
            )
    return out


def _tensor(tensor_proto: bytes) -> np.ndarray | list[str]:
    dtype, content, strings, ints = 0, b"", [], []
    for field, v in proto_fields(tensor_proto):
        if field == 1:
            dtype = int(v)  # type: ignore[arg-type]
        elif field == 4:
            content = v  # type: ignore[assignment]
        elif field == 8:
            strings.append(v.decode())  # type: ignore[union-attr]
        elif field == 10:
            ints.append(int(v))  # type: ignore[arg-type]
    if dtype == DT_STRING:
        return strings
    if content:
        return np.frombuffer(content, _DTYPES[dtype]).copy()
    return np.array(ints, dtype=np.int64)


def _graph_nodes(saved_model: bytes) -> Iterator[tuple[str, str, list[str], dict[str, bytes]]]:
    """(name, op, inputs, attrs) of the nodes of the first meta graph's graph_def."""
    for field, meta_graph in proto_fields(saved_model):
        if field != 2:
            continue
        for f2, graph_def in proto_fields(meta_graph):  # type: ignore[arg-type]
            if f2 != 2:
                continue
            for f3, node in proto_fields(graph_def):  # type: ignore[arg-type]
                if f3 != 1:
                    continue
                name, op, inputs, attrs = "", "", [], {}
                for f4, v in proto_fields(node):  # type: ignore[arg-type]
                    if f4 == 1:
                        name = v.decode()  # type: ignore[union-attr]
                    elif f4 == 2:
                        op = v.decode()  # type: ignore[union-attr]
                    elif f4 == 3:
                        inputs.append(v.decode())  # type: ignore[union-attr]
                    elif f4 == 5:
                        entry = dict(proto_fields(v))  # type: ignore[arg-type]
                        attrs[entry[1].decode()] = entry.get(2, b"")  # type: ignore[union-attr]
                yield name, op, inputs, attrs
        return


def read_lookup_tables(saved_model: bytes, serving_input: str) -> list[dict[str, int]]:
    """The string → index tables the serving function uses, in the order it takes them.

    Keras exports each adapted StringLookup as a hash table filled at load time from two
    graph constants (keys, values); the serving call lists the table handles in layer order."""
    consts: dict[str, bytes] = {}
    inits: dict[str, tuple[str, str]] = {}
    serving: list[str] = []
    for name, op, inputs, attrs in _graph_nodes(saved_model):
        if op == "Const" and "value" in attrs:
            tensor = dict(proto_fields(attrs["value"])).get(8)
            if tensor is not None:
                consts[name] = tensor  # type: ignore[assignment]
        elif op == "StatefulPartitionedCall" and inputs:
            if inputs[0] == serving_input:
                serving = inputs
            elif len(inputs) == 3:
                inits[inputs[0]] = (inputs[1], inputs[2])
    tables = []
    for handle in serving:
        if handle in inits:
            keys_name, values_name = inits[handle]
            keys, values = _tensor(consts[keys_name]), _tensor(consts[values_name])
            if isinstance(keys, list) and not isinstance(values, list):
                tables.append(dict(zip(keys, (int(v) for v in values), strict=True)))
    return tables


def multi_category_encoding(keras_metadata: bytes) -> list[str]:
    """AutoKeras' per-column encodings ("none" = numeric, "int" = string lookup), from the
    layer config Keras stored in keras_metadata.pb."""
    match = re.search(
        rb'"class_name": "Custom>MultiCategoryEncoding", "config": \{[^{]*?"encoding": (\[[^\]]*\])',
        keras_metadata,
    )
    if match is None:
        raise ValueError("no MultiCategoryEncoding layer in keras_metadata.pb")
    return json.loads(match.group(1))
