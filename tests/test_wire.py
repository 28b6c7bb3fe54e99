"""Tensors on the wire: exact round trips, interoperability with plain .npy, refusals."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedtt.federated import wire


@pytest.mark.parametrize("shape", [(), (1,), (5, 8, 5), (384,), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_round_trip_is_exact_and_readable_by_numpy(shape, dtype):
    t = (torch.randn(shape) * 100).to(dtype)
    a = wire.to_array(t)
    assert torch.equal(wire.from_array(a), t)
    assert np.array_equal(np.load(io.BytesIO(a.data), allow_pickle=False), t.numpy())
    assert np.array_equal(a.numpy(), t.numpy())  # Flower's own decoder agrees
    flower = Array.from_torch_tensor(t)
    assert torch.equal(wire.from_array(flower), t)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(), (7,), (5, 8, 5)])
def test_payload_precision_round_trip_is_the_cast(precision, shape):
    t = torch.randn(shape) * 10
    a = wire.to_array(t, precision)
    got = wire.from_array(a)
    assert a.dtype == precision and got.dtype == wire.PRECISIONS[precision]
    assert torch.equal(got, t.to(wire.PRECISIONS[precision]))  # exactly the cast, no drift
    assert len(a.data) - len(wire._header(precision, shape)) == t.numel() * wire.itemsize(
        precision)


def test_non_canonical_header_falls_back_to_numpy():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, values, version=(2, 0))  # another header layout
    a = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=buf.getvalue())
    assert torch.equal(wire.from_array(a), torch.from_numpy(values))


@pytest.mark.parametrize("data, match", [
    (lambda a: a.data[:-4], "cannot decode"),
    (lambda a: a.data + b"\0" * 8, "cannot decode"),
])
def test_corrupt_bytes_are_refused(data, match):
    a = wire.to_array(torch.ones(3, 4))
    bad = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=data(a))
    with pytest.raises(ValueError, match=match):
        wire.from_array(bad)


def test_header_that_lies_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4), np.float64), allow_pickle=False)
    a = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(ValueError, match="announced"):
        wire.from_array(a)


def test_object_arrays_are_refused_without_unpickling():
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    a = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        wire.from_array(a)
