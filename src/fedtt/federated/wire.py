"""Tensors on the wire: Flower `Array`s in .npy format, encoded and decoded without waste.

Flower's own `Array.from_torch_tensor` / `Array.numpy` write and parse a .npy header per
tensor (the parse goes through `ast`); for adapters made of a few hundred tiny tensors that
costs more than the tensors. Here the header for a (dtype, shape) is built once and reused:
encoding is header + raw bytes, and decoding checks that the bytes start with exactly that
header before viewing the rest. Anything else (another numpy's header layout, a lie about the
dtype) falls back to `np.load(..., allow_pickle=False)` and a check of what it produced. The
format is plain .npy either way, so any Flower peer reads and writes it (bfloat16, which
numpy lacks, travels as its uint16 bits).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"


# Payload precisions (`federation.precision`). numpy has no bfloat16: its bits travel as a
# uint16 .npy under the Array dtype name "bfloat16" and are viewed back on arrival.
PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORED_AS = {"bfloat16": "uint16"}


def itemsize(precision: str) -> int:
    """Bytes per value on the wire."""
    return PRECISIONS[precision].itemsize


@lru_cache(maxsize=4096)
def _header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The exact header `np.save` writes for this dtype and shape (no array is allocated)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(_dtype(dtype)), "fortran_order": False,
        "shape": shape})
    return buf.getvalue()


@lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
    """The numpy dtype that holds an Array of dtype `name` (bfloat16: its uint16 bits)."""
    try:
        return np.dtype(_STORED_AS.get(name, name))
    except TypeError as exc:
        raise ValueError(f"unknown dtype {name!r}") from exc


def to_array(tensor: torch.Tensor, precision: str | None = None) -> Array:
    """Encode a tensor, cast to `precision` (a PRECISIONS name) when given."""
    tensor = tensor.detach().cpu()
    if precision is not None:
        tensor = tensor.to(PRECISIONS[precision])
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype in _STORED_AS:
        tensor = tensor.view(torch.int16)
    values = tensor.contiguous().numpy()
    shape = tuple(values.shape)
    return Array(dtype=dtype, shape=shape, stype=NUMPY_STYPE,
                 data=_header(dtype, shape) + values.tobytes())


def to_record(tensors: Mapping[str, torch.Tensor],
              precision: str | None = None) -> ArrayRecord:
    return ArrayRecord(array_dict={n: to_array(t, precision) for n, t in tensors.items()})


def from_array(array: Array) -> torch.Tensor:
    """Decode an Array (no pickle, ever); ValueError if its bytes do not match its header."""
    tensor = torch.from_numpy(numpy_from_array(array).copy())
    return tensor.view(torch.bfloat16) if str(array.dtype) == "bfloat16" else tensor


def numpy_to_array(values: np.ndarray) -> Array:
    """Encode a numpy array (any plain dtype, e.g. secure aggregation's uint64) as .npy."""
    values = np.ascontiguousarray(values)
    shape = tuple(values.shape)
    return Array(dtype=str(values.dtype), shape=shape, stype=NUMPY_STYPE,
                 data=_header(str(values.dtype), shape) + values.tobytes())


def numpy_from_array(array: Array) -> np.ndarray:
    """Decode an Array to a read-only numpy view (bfloat16: its uint16 bits); no pickle,
    ever; ValueError if its bytes do not match its header."""
    if array.stype != NUMPY_STYPE:
        raise ValueError(f"unsupported array type {array.stype!r}")
    dtype = _dtype(str(array.dtype))
    shape = tuple(int(d) for d in array.shape)
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would need pickle)")
    header = _header(str(array.dtype), shape)
    data = array.data
    if data.startswith(header) and len(data) == len(header) + dtype.itemsize * math.prod(shape):
        values = np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
    else:
        stream = io.BytesIO(data)
        try:
            values = np.load(stream, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"cannot decode ({type(exc).__name__}: {exc})") from None
        if stream.tell() != len(data):
            raise ValueError(f"cannot decode: {len(data) - stream.tell()} bytes past the array")
        if values.dtype != dtype or tuple(values.shape) != shape:
            raise ValueError(f"bytes hold {values.dtype} {tuple(values.shape)}, the header "
                             f"announced {dtype} {shape}")
    return values


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: from_array(array) for name, array in record.items()}
