"""What a message carries: every tensor of one direction of one round packed into one array.

Flower sends each `Array` of a message as objects of its own (a JSON descriptor, a content id,
the .npy bytes) and an `ArrayRecord` lists every name beside its 64-character id, so an
adapter of 172 tensors of a few hundred bytes each would pay more for framing than for values.
Here a message holds one flat array, `PACKED`: the tensors concatenated in the order both
sides already know (the run's list of travelling tensors, `Runtime.sent`), and which of them
it holds travels as a bit mask over that list. Shapes are never sent: each side knows them
from the TT rank the message names.

`message_bytes` is what Flower puts on the wire for a message: every object of its tree,
deflated as Flower pushes it (transport framing aside). The ledger's per-tensor rows are a
view of the packed payload; its message rows carry these wire bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtt.federated import wire

PACKED = "packed"  # the one array of a packed record


def pack(tensors: Sequence[torch.Tensor], precision: str = "float32") -> ArrayRecord:
    """One record holding `tensors` flattened and concatenated, at the wire precision."""
    flat = [t.detach().reshape(-1) for t in tensors]
    joined = torch.cat(flat) if flat else torch.zeros(0)
    return ArrayRecord(array_dict={PACKED: wire.to_array(joined, precision)})


def packed_array(record: ArrayRecord) -> Array:
    """The packed array of a record; ValueError unless it holds exactly that array."""
    names = list(record.keys())
    if names != [PACKED]:
        raise ValueError(f"expected one array named {PACKED!r}, got {_few(names)}")
    return record[PACKED]


def split(flat: torch.Tensor, layout: Sequence[tuple[str, torch.Size]]
          ) -> dict[str, torch.Tensor]:
    """Cut a packed vector back into named tensors of the given shapes."""
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"packed array holds {tuple(flat.shape)} values, the layout needs "
                         f"({sum(sizes)},)")
    parts = torch.split(flat, sizes) if sizes else []
    return {name: part.reshape(shape)
            for (name, shape), part in zip(layout, parts, strict=True)}


def unpack(record: ArrayRecord, layout: Sequence[tuple[str, torch.Size]]
           ) -> dict[str, torch.Tensor]:
    """The tensors of a packed record (trusted: what a client receives from its server)."""
    return split(wire.from_array(packed_array(record)), layout)


def encode_mask(indices: Sequence[int], size: int) -> bytes:
    """The bit mask of `indices` among `size` positions."""
    bits = np.zeros(size, dtype=bool)
    bits[list(indices)] = True
    return np.packbits(bits).tobytes()


def decode_mask(mask: bytes, size: int) -> list[int]:
    """Positions set in a mask of `size` bits; ValueError for a mask of another length."""
    if len(mask) != (size + 7) // 8:
        raise ValueError(f"mask of {len(mask)} bytes, {(size + 7) // 8} expected")
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8))
    if bits[size:].any():
        raise ValueError("mask sets bits past the tensors it indexes")
    return [int(i) for i in np.flatnonzero(bits[:size])]


def select(names: Sequence[str], mask: bytes) -> list[str]:
    """The names a mask over `names` selects, in their order."""
    return [names[i] for i in decode_mask(mask, len(names))]


def mask_of(names: Sequence[str], chosen: Sequence[str] | Mapping[str, object]) -> bytes:
    """The mask over `names` that selects `chosen`."""
    wanted = set(chosen)
    return encode_mask([i for i, n in enumerate(names) if n in wanted], len(names))


def train_config(server_round: int, train_mask: bytes, arrays_mask: bytes, stateful: bool,
                 rank: int | None = None) -> ConfigRecord:
    """A train message's config: the round, what to train, what the payload holds and at
    which TT rank (0: the global adapter's)."""
    return ConfigRecord({"server-round": server_round, "train": train_mask,
                         "arrays": arrays_mask, "rank": rank or 0, "stateful": stateful})


def message_bytes(message: Message) -> int:
    """Bytes Flower sends for `message`: each object of its tree, deflated, counted once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def _few(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
