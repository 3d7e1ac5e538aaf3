"""Convert torch tensors to and from the wire message ``moemesh.v1.Tensor``.

The message carries a dtype enum, the shape (outermost dimension first) and the elements as one
flat, row-major (C order) byte string in each dtype's raw little-endian encoding. bfloat16 and
float16 travel as their raw 16-bit words, so a round trip is bit-exact for every supported dtype,
NaN payloads and negative zeros included.

`from_proto` is the boundary where bytes from another process become a tensor, so it checks
everything it relies on: a known dtype, non-negative dimensions, and
``len(data) == prod(shape) * itemsize``. Any violation raises
`moemesh.errors.InvalidRequestError` (INVALID_ARGUMENT over gRPC) with a message naming the
problem. The result is a fresh, writable, contiguous CPU tensor that owns its memory.

Hidden states between workers go over the data plane (gloo / NCCL), not through this module; it is
for control-plane payloads such as load statistics, which stay far below gRPC's message size limit.
"""

from __future__ import annotations

import math
import sys

import torch

from moemesh.errors import InvalidRequestError
from moemesh.v1 import common_pb2

__all__ = ["DTYPE_TO_PROTO", "PROTO_TO_DTYPE", "from_proto", "to_proto"]

if sys.byteorder != "little":  # pragma: no cover - every supported host (x86-64, aarch64) is LE
    raise ImportError("moemesh.tensor_wire encodes tensors as little-endian bytes; this host is big-endian")

#: torch dtype -> wire enum value, for every dtype the wire format carries.
DTYPE_TO_PROTO: dict[torch.dtype, common_pb2.DType.ValueType] = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.int32: common_pb2.DTYPE_INT32,
    torch.float64: common_pb2.DTYPE_FLOAT64,
    torch.int16: common_pb2.DTYPE_INT16,
    torch.int8: common_pb2.DTYPE_INT8,
    torch.uint8: common_pb2.DTYPE_UINT8,
    torch.bool: common_pb2.DTYPE_BOOL,
}

#: wire enum value -> torch dtype (the inverse of DTYPE_TO_PROTO).
PROTO_TO_DTYPE: dict[common_pb2.DType.ValueType, torch.dtype] = {wire: dtype for dtype, wire in DTYPE_TO_PROTO.items()}


def to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    """Encode `t` (any device, contiguous or not) as a ``moemesh.v1.Tensor``.

    Raises InvalidRequestError if `t`'s dtype has no wire encoding (complex, float8, ...).
    """
    wire_dtype = DTYPE_TO_PROTO.get(t.dtype)
    if wire_dtype is None:
        raise InvalidRequestError(f"cannot encode a {t.dtype} tensor: supported dtypes are {_supported()}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # A uint8 view of the flat buffer gives the raw element bytes for every dtype, bf16 included
    # (numpy has no bfloat16, so never convert through a numpy array of the element type).
    data = flat.view(torch.uint8).numpy().tobytes()
    return common_pb2.Tensor(dtype=wire_dtype, shape=list(t.shape), data=data)


def from_proto(msg: common_pb2.Tensor) -> torch.Tensor:
    """Decode a ``moemesh.v1.Tensor`` into a new CPU tensor; bit-exact inverse of `to_proto`.

    Raises InvalidRequestError when the dtype is unknown or unset, a dimension is negative, or the
    data length does not match prod(shape) * itemsize.
    """
    dtype = PROTO_TO_DTYPE.get(msg.dtype)
    if dtype is None:
        raise InvalidRequestError(
            f"tensor has unknown dtype {_dtype_name(msg.dtype)}: supported dtypes are {_supported()}"
        )
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    data = msg.data
    if len(data) != expected:
        raise InvalidRequestError(
            f"tensor data is {len(data)} bytes but shape {list(shape)} of {_dtype_name(msg.dtype)} "
            f"needs {math.prod(shape)} x {itemsize} = {expected} bytes"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray copies the immutable bytes once; frombuffer then shares that writable buffer,
    # which the returned tensor keeps alive.
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if dtype == torch.bool:
        # Any non-zero byte is true; normalise so the tensor never holds bytes other than 0 / 1.
        return raw.ne(0).reshape(shape)
    return raw.view(dtype).reshape(shape)


def _dtype_name(value: common_pb2.DType.ValueType) -> str:
    try:
        return common_pb2.DType.Name(value)
    except ValueError:
        return str(value)


def _supported() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in DTYPE_TO_PROTO)
