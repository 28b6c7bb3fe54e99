"""Server-side validation of client replies: every reply is untrusted input.

A train reply must carry exactly the tensors the server asked for this round, packed into one
array (`payload.py`) of the wire dtype and the length of their shapes, finite and of bounded
magnitude, in no more bytes than that plan allows, plus a positive, integral, plausible
example count (not under local DP) and the client's partition id.
Arrays are decoded only by `wire.from_array` (raw bytes behind an exact .npy header, else numpy
with `allow_pickle=False`), and only after their byte size has been checked, so a reply cannot
make the server allocate more than the plan says. A failing reply raises `Rejected` with a
reason for the log, the ledger and the round record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedtt.federated import payload, wire

NPY_HEADER_ALLOWANCE = 256  # bytes of .npy header on top of the raw data


class Rejected(ValueError):
    """A client reply failed validation; the message is the reason."""


@dataclass(frozen=True)
class ReplyRules:
    """What a valid train reply looks like in this round."""

    expected: Mapping[str, torch.Tensor]  # name -> current global tensor (shape, dtype)
    num_partitions: int
    max_examples: int
    max_abs_value: float
    precision: str = "float32"  # dtype on the wire; decoded tensors come back as `expected`'s
    counts: bool = True  # replies carry num-examples (not under local DP: every reply weighs 1)


def check_train_reply(content: RecordDict, rules: ReplyRules
                      ) -> tuple[dict[str, torch.Tensor], float, int, dict[str, float]]:
    """(tensors, example count, partition id, other metrics) of a valid reply, else Rejected.

    The tensors arrive packed (`payload.py`) in the order of `rules.expected`; without
    `rules.counts` the example count is 1 for every reply."""
    metrics = _record(content, "metrics", MetricRecord)
    arrays = _record(content, "arrays", ArrayRecord)
    client = _integer(metrics, "partition-id", 0, rules.num_partitions - 1)
    examples = _integer(metrics, "num-examples", 1, rules.max_examples) if rules.counts else 1
    try:
        packed = payload.packed_array(arrays)
    except ValueError as exc:
        raise Rejected(f"wrong tensors: {exc}") from None
    layout = [(name, ref.shape) for name, ref in rules.expected.items()]
    total = sum(ref.numel() for ref in rules.expected.values())
    flat = _tensor(payload.PACKED, packed, torch.empty(total, device="meta"), rules.precision)
    tensors = {name: t.to(rules.expected[name].dtype)
               for name, t in payload.split(flat, layout).items()}
    _check_values(tensors, rules.max_abs_value)
    skip = ("partition-id", "num-examples", "tt-rank")  # checked above or by the strategy
    others = _check_metrics({k: v for k, v in metrics.items() if k not in skip}, TRAIN_METRICS)
    return tensors, float(examples), client, others


# What a reply may report besides its tensors: key -> (lowest, highest, integral).
TRAIN_METRICS = {"train_loss": (0.0, 1e6, False), "train_seconds": (0.0, 1e7, False),
                 "epsilon": (0.0, 1e6, False), "dp_steps": (0, 10**12, True)}
# A masked reply (secure aggregation) reports no example count or loss: they travel masked.
SECURE_TRAIN_METRICS = {k: v for k, v in TRAIN_METRICS.items() if k != "train_loss"}
EVALUATE_METRICS = {"local_accuracy": (0.0, 1.0, False), "local_macro_f1": (0.0, 1.0, False),
                    "local_loss": (0.0, 1e6, False),
                    "local_perplexity": (1.0, 1e300, False)}  # causal-lm


def check_masked_metrics(content: RecordDict, num_partitions: int
                         ) -> tuple[int, dict[str, float]]:
    """(partition id, other metrics) of a masked train reply (secure aggregation), else
    Rejected; a count or a loss in the clear is refused, as they travel masked."""
    metrics = _record(content, "metrics", MetricRecord)
    client = _integer(metrics, "partition-id", 0, num_partitions - 1)
    return client, _check_metrics({k: v for k, v in metrics.items() if k != "partition-id"},
                                  SECURE_TRAIN_METRICS)


def check_evaluate_reply(content: RecordDict, max_examples: int
                         ) -> tuple[float, dict[str, float]]:
    """(example count, metrics) of a valid evaluate reply, else Rejected."""
    metrics = _record(content, "metrics", MetricRecord)
    examples = _integer(metrics, "num-examples", 1, max_examples)
    skip = ("partition-id", "num-examples")
    return float(examples), _check_metrics(
        {k: v for k, v in metrics.items() if k not in skip}, EVALUATE_METRICS)


def _check_metrics(metrics: Mapping, schema: Mapping[str, tuple[float, float, bool]]
                   ) -> dict[str, float]:
    """Every metric known, a finite number and in its range, like a tensor; else Rejected."""
    out = {}
    for key, value in metrics.items():
        if key not in schema:
            raise Rejected(f"unknown metric {key!r}")
        low, high, integral = schema[key]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise Rejected(f"metric {key!r} is not a finite number: {value!r}")
        if not low <= value <= high or (integral and value != int(value)):
            kind = "an integer" if integral else "a number"
            raise Rejected(f"metric {key!r} = {value!r} is not {kind} in [{low:g}, {high:g}]")
        out[key] = float(value)
    return out


def _record(content: RecordDict, key: str, kind: type):
    try:
        record = content[key]
    except (KeyError, TypeError):
        raise Rejected(f"reply has no {key!r} record") from None
    if not isinstance(record, kind):
        raise Rejected(f"reply's {key!r} is a {type(record).__name__}, not a {kind.__name__}")
    return record


def _integer(metrics: MetricRecord, key: str, low: int, high: int) -> int:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(f"{key} missing or not a number: {value!r}")
    if not math.isfinite(value) or value != int(value) or not low <= value <= high:
        raise Rejected(f"{key} = {value!r} is not an integer in [{low}, {high}]")
    return int(value)


def _tensor(name: str, array, ref: torch.Tensor, precision: str) -> torch.Tensor:
    if array.dtype != precision:
        raise Rejected(f"{name}: dtype {array.dtype}, expected {precision}")
    if tuple(array.shape) != tuple(ref.shape):
        raise Rejected(f"{name}: shape {tuple(array.shape)}, expected {tuple(ref.shape)}")
    budget = ref.numel() * wire.itemsize(precision) + NPY_HEADER_ALLOWANCE
    if len(array.data) > budget:
        raise Rejected(f"{name}: {len(array.data)} bytes, more than the {budget} allowed")
    try:
        value = wire.from_array(array)  # truncated, corrupt, pickled, lying: refused
    except ValueError as exc:
        raise Rejected(f"{name}: {exc}") from None
    return value.float()  # the server's master copy stays in float32


def _check_values(tensors: Mapping[str, torch.Tensor], max_abs: float) -> None:
    """Finite and bounded, checked over all tensors at once; the culprit named on failure."""
    flat = [t.reshape(-1).float() for t in tensors.values()]
    if not flat or sum(t.numel() for t in flat) == 0:
        return
    joined = torch.cat(flat)
    if bool(torch.isfinite(joined).all()) and float(joined.abs().max()) <= max_abs:
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise Rejected(f"{name}: contains NaN or Inf")
        if t.numel() and float(t.abs().max()) > max_abs:
            raise Rejected(f"{name}: |value| up to {float(t.abs().max()):.3g} exceeds "
                           f"{max_abs:g}")


def update_norm(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a client's update, new - old over all its tensors together."""
    return math.sqrt(sum(float((new[n] - old[n]).double().pow(2).sum()) for n in new))


def clip_update(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor],
                max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale a client's update (new - old, over all its tensors) to at most `max_norm`.

    Returns the clipped tensors and the update's original norm.
    """
    norm = update_norm(new, old)
    if norm <= max_norm or norm == 0.0:
        return dict(new), norm
    scale = max_norm / norm
    return {n: old[n] + (new[n] - old[n]) * scale for n in new}, norm
