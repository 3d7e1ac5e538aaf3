"""moemesh.tensor_wire: torch tensors <-> moemesh.v1.Tensor, bit-exact, with checked input."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.errors import InvalidRequestError
from moemesh.tensor_wire import DTYPE_TO_PROTO, PROTO_TO_DTYPE, from_proto, to_proto
from moemesh.v1 import common_pb2

ALL_DTYPES = list(DTYPE_TO_PROTO)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Integer dtype with the same item size, to compare float tensors bit for bit (NaN != NaN).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t
    return t.contiguous().view(_BITS[t.element_size()])


def _assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _wire_roundtrip(msg: common_pb2.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor.FromString(msg.SerializeToString())


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4)], ids=str)
def test_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    msg = _wire_roundtrip(to_proto(t))
    assert msg.dtype == DTYPE_TO_PROTO[dtype]
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == math.prod(shape) * t.element_size()
    _assert_identical(from_proto(msg), t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=str)
def test_empty_tensors(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=dtype)
    msg = _wire_roundtrip(to_proto(t))
    assert msg.data == b""
    assert list(msg.shape) == list(shape)
    _assert_identical(from_proto(msg), t)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_float_values_survive(dtype: torch.dtype) -> None:
    t = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.5], dtype=torch.float32).to(dtype)
    back = from_proto(to_proto(t))
    _assert_identical(back, t)
    assert math.copysign(1.0, float(back[1])) == -1.0  # negative zero kept


def test_bfloat16_travels_as_raw_words() -> None:
    t = torch.tensor([1.0, -2.0, 0.5, 3.140625], dtype=torch.bfloat16)
    msg = to_proto(t)
    assert msg.dtype == common_pb2.DTYPE_BFLOAT16
    # bfloat16 is the top half of a float32: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00, 3.140625 = 0x4049.
    assert msg.data == struct.pack("<4H", 0x3F80, 0xC000, 0x3F00, 0x4049)


def test_bfloat16_arbitrary_words_including_nan_payloads_are_preserved() -> None:
    words = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x0001, 0x3F80]
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_BFLOAT16, shape=[2, 4], data=struct.pack("<8H", *words))
    t = from_proto(msg)
    assert t.dtype == torch.bfloat16 and t.shape == (2, 4)
    signed = [struct.unpack("<h", struct.pack("<H", w))[0] for w in words]
    assert t.view(torch.int16).reshape(-1).tolist() == signed
    assert to_proto(t).data == msg.data


def test_float16_travels_as_raw_words() -> None:
    msg = to_proto(torch.tensor([1.0, -2.0, 65504.0], dtype=torch.float16))
    assert msg.data == struct.pack("<3H", 0x3C00, 0xC000, 0x7BFF)


def test_layout_is_flat_row_major_little_endian() -> None:
    t = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    msg = to_proto(t)
    assert list(msg.shape) == [2, 3]
    assert msg.data == struct.pack("<6i", 1, 2, 3, 4, 5, 6)
    assert to_proto(torch.tensor(-7, dtype=torch.int64)).data == struct.pack("<q", -7)


def test_non_contiguous_and_grad_tensors_are_encoded_by_value() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    transposed = base.t()
    strided = base[::2, 1::3]
    for view in (transposed, strided, base.expand(2, 4, 6)):
        _assert_identical(from_proto(to_proto(view)), view.contiguous())
    leaf = torch.ones(3, requires_grad=True)
    _assert_identical(from_proto(to_proto(leaf * 2)), torch.full((3,), 2.0))


def test_decoded_tensor_owns_writable_memory() -> None:
    msg = to_proto(torch.zeros(4, dtype=torch.int64))
    data_before = msg.data
    t = from_proto(msg)
    assert t.is_contiguous()
    t += 5  # writable, and must not alias the message
    assert msg.data == data_before
    assert from_proto(msg).tolist() == [0, 0, 0, 0]


def test_bool_bytes_other_than_one_decode_as_true() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_BOOL, shape=[4], data=bytes([0, 1, 2, 255]))
    t = from_proto(msg)
    assert t.tolist() == [False, True, True, True]
    assert to_proto(t).data == bytes([0, 1, 1, 1])


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([d for d in ALL_DTYPES if d != torch.bool]),
    shape=st.lists(st.integers(0, 4), max_size=4),
    data=st.data(),
)
def test_any_bit_pattern_round_trips(dtype: torch.dtype, shape: list[int], data: st.DataObject) -> None:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = data.draw(st.binary(min_size=nbytes, max_size=nbytes))
    msg = common_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=shape, data=raw)
    t = from_proto(msg)
    assert list(t.shape) == shape
    assert to_proto(t) == msg


# --------------------------------------------------------------------------------------------
# The dtype table follows the proto


def test_every_wire_dtype_has_a_torch_dtype() -> None:
    wire_values = {v.number for v in common_pb2.DType.DESCRIPTOR.values}
    wire_values.discard(common_pb2.DTYPE_UNSPECIFIED)
    assert set(PROTO_TO_DTYPE) == wire_values
    assert len(PROTO_TO_DTYPE) == len(DTYPE_TO_PROTO)


# --------------------------------------------------------------------------------------------
# Malformed input


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("delta", [-1, 1])
def test_size_mismatch_raises(dtype: torch.dtype, delta: int) -> None:
    msg = to_proto(_sample(dtype, (2, 3)))
    msg.data = msg.data[:delta] if delta < 0 else msg.data + b"\x00"
    with pytest.raises(InvalidRequestError, match=r"tensor data is \d+ bytes but shape \[2, 3\]"):
        from_proto(msg)


def test_size_mismatch_message_names_the_expected_size() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_BFLOAT16, shape=[3], data=b"\x00" * 4)
    with pytest.raises(InvalidRequestError) as info:
        from_proto(msg)
    message = str(info.value)
    assert "4 bytes" in message and "DTYPE_BFLOAT16" in message and "3 x 2 = 6 bytes" in message


def test_data_for_an_empty_shape_raises() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[0, 3], data=b"\x00" * 4)
    with pytest.raises(InvalidRequestError, match="needs 0 x 4 = 0 bytes"):
        from_proto(msg)


def test_missing_data_for_a_scalar_raises() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[])
    with pytest.raises(InvalidRequestError, match="0 bytes but shape"):
        from_proto(msg)


@pytest.mark.parametrize("value", [common_pb2.DTYPE_UNSPECIFIED, 99])
def test_unknown_dtype_raises(value: int) -> None:
    msg = common_pb2.Tensor(dtype=value, shape=[1], data=b"\x00" * 4)
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        from_proto(msg)


def test_negative_dimension_raises() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, 2], data=b"")
    with pytest.raises(InvalidRequestError, match="negative dimension"):
        from_proto(msg)


def test_huge_declared_shape_is_rejected_without_allocating() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1 << 40, 1 << 20], data=b"\x00" * 8)
    with pytest.raises(InvalidRequestError, match="tensor data is 8 bytes"):
        from_proto(msg)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn], ids=str)
def test_unsupported_torch_dtype_raises(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidRequestError, match="cannot encode"):
        to_proto(torch.zeros(2, dtype=dtype))
