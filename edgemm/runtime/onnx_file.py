"""Read the opset imports of an ONNX file without the `onnx` package.

An ONNX file is a serialized `ModelProto`. Its top-level field 8, `opset_import`, is a
repeated `OperatorSetIdProto` with `domain` (field 1, string) and `version` (field 2, int64).
Reading only these fields needs a few lines of protobuf wire-format parsing. The graph
(field 7) is skipped by its length without being read, so this is cheap for large models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from edgemm.errors import PackageError

_MODEL_OPSET_IMPORT = 8
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
DEFAULT_DOMAINS = ("", "ai.onnx")


class _Truncated(Exception):
    pass


def read_opset_imports(path: Path) -> dict[str, int]:
    """Return {domain: version} from the `opset_import` list of an ONNX model file.

    The default domain is returned as "". Raises `PackageError` when the file is not a
    well-formed protobuf message or lists no opset for the default domain.
    """
    path = Path(path)
    size = path.stat().st_size
    opsets: dict[str, int] = {}
    try:
        with open(path, "rb") as handle:
            while handle.tell() < size:
                field, wire_type = _read_key(handle)
                if field == _MODEL_OPSET_IMPORT and wire_type == _LENGTH_DELIMITED:
                    length = _read_varint(handle)
                    domain, version = _parse_opset_id(_read_exact(handle, length))
                    opsets["" if domain in DEFAULT_DOMAINS else domain] = version
                else:
                    _skip(handle, wire_type, size)
    except (_Truncated, ValueError) as error:
        raise PackageError(
            f"{path} is not a valid ONNX model ({error}).",
            "The file is truncated or is not an ONNX file; export the package again.",
        ) from error

    if "" not in opsets:
        raise PackageError(
            f"{path} is not a valid ONNX model: it declares no opset for the default ONNX domain.",
            "The file is damaged or is not an ONNX file; export the package again.",
        )
    return opsets


def _parse_opset_id(data: bytes) -> tuple[str, int]:
    domain = ""
    version = 0
    position = 0
    while position < len(data):
        key, position = _decode_varint(data, position)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == _LENGTH_DELIMITED:
            length, position = _decode_varint(data, position)
            if position + length > len(data):
                raise _Truncated("opset_import entry ends early")
            domain = data[position : position + length].decode("utf-8")
            position += length
        elif field == 2 and wire_type == _VARINT:
            version, position = _decode_varint(data, position)
        elif wire_type == _VARINT:
            _, position = _decode_varint(data, position)
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _decode_varint(data, position)
            position += length
        elif wire_type in (_FIXED64, _FIXED32):
            position += 8 if wire_type == _FIXED64 else 4
        else:
            raise ValueError(f"unknown protobuf wire type {wire_type}")
    if position > len(data):
        raise _Truncated("opset_import entry ends early")
    return domain, version


def _read_key(handle: BinaryIO) -> tuple[int, int]:
    key = _read_varint(handle)
    field, wire_type = key >> 3, key & 7
    if field == 0:
        raise ValueError("protobuf field number 0")
    return field, wire_type


def _skip(handle: BinaryIO, wire_type: int, size: int) -> None:
    if wire_type == _VARINT:
        _read_varint(handle)
        return
    if wire_type == _LENGTH_DELIMITED:
        length = _read_varint(handle)
    elif wire_type == _FIXED64:
        length = 8
    elif wire_type == _FIXED32:
        length = 4
    else:
        raise ValueError(f"unknown protobuf wire type {wire_type}")
    if handle.tell() + length > size:
        raise _Truncated(f"a field of {length} bytes runs past the end of the file ({size} bytes)")
    handle.seek(length, os.SEEK_CUR)


def _read_exact(handle: BinaryIO, length: int) -> bytes:
    data = handle.read(length)
    if len(data) != length:
        raise _Truncated("the file ends inside a field")
    return data


def _read_varint(handle: BinaryIO) -> int:
    result = 0
    for shift in range(0, 70, 7):
        byte = handle.read(1)
        if not byte:
            raise _Truncated("the file ends inside a number")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
    raise ValueError("a protobuf varint is longer than 10 bytes")


def _decode_varint(data: bytes, position: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if position >= len(data):
            raise _Truncated("opset_import entry ends inside a number")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
    raise ValueError("a protobuf varint is longer than 10 bytes")
