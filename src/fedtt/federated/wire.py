"""Tensors on the wire: Flower `Array`s in .npy format, encoded and decoded without waste.

Flower's own `Array.from_torch_tensor` / `Array.numpy` write and parse a .npy header per
tensor (the parse goes through `ast`); for adapters made of a few hundred tiny tensors that
costs more than the tensors. Here the header for a (dtype, shape) is built once and reused:
encoding is header + raw bytes, and decoding checks that the bytes start with exactly that
header before viewing the rest. Anything else (another numpy's header layout, a lie about the
dtype) falls back to `np.load(..., allow_pickle=False)` and a check of what it produced. The
format is plain .npy either way, so any Flower peer reads and writes it.
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


@lru_cache(maxsize=4096)
def _header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The exact header `np.save` writes for this dtype and shape (no array is allocated)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": shape})
    return buf.getvalue()


@lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise ValueError(f"unknown dtype {name!r}") from exc


def to_array(tensor: torch.Tensor) -> Array:
    values = tensor.detach().cpu().contiguous().numpy()
    dtype, shape = values.dtype.name, tuple(values.shape)
    return Array(dtype=dtype, shape=shape, stype=NUMPY_STYPE,
                 data=_header(dtype, shape) + values.tobytes())


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(array_dict={n: to_array(t) for n, t in tensors.items()})


def from_array(array: Array) -> torch.Tensor:
    """Decode an Array (no pickle, ever); ValueError if its bytes do not match its header."""
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
    return torch.from_numpy(values.copy())


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: from_array(array) for name, array in record.items()}
