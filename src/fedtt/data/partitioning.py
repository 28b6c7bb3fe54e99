"""Splitting a dataset across federated clients with flwr-datasets' partitioners (IID,
Dirichlet label skew, pathological k-classes-per-client), counting each client's labels, and
printing those counts as a table."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from fedtt.data.common import DataError, _column

SCHEMES = ("iid", "dirichlet", "pathological")


def partition(ds: datasets.Dataset, num_partitions: int, *, scheme: str = "iid",
              alpha: float = 0.5, classes_per_partition: int = 2,
              seed: int = 0) -> list[datasets.Dataset]:
    """Split `ds` into `num_partitions` client datasets with a flwr-datasets partitioner.

    - iid: a seeded shuffle, then `IidPartitioner` (equal contiguous shards, sizes differ by
      at most one).
    - dirichlet: `DirichletPartitioner` on `label` with concentration `alpha` (smaller = more
      label skew), `self_balancing=True` and `min_partition_size=1`: flwr redraws (up to 10
      times) until no client is empty.
    - pathological: `PathologicalPartitioner`, each client gets exactly
      `classes_per_partition` labels (first one round robin, so every class is used when there
      are at least as many clients as classes).

    Extra columns are kept. Same seed, same partition. Bad settings raise `DataError`.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) \
            or num_partitions < 1:
        raise DataError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions > len(ds):
        raise DataError(f"cannot split {len(ds)} examples into {num_partitions} partitions: "
                         "more partitions than examples")
    if not alpha > 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    if scheme != "iid" and "label" not in ds.column_names:
        raise DataError(f"scheme {scheme!r} needs a 'label' column; columns: {ds.column_names}")

    partitioner: Any
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner shards contiguously without shuffling: shuffle first.
        partitioner.dataset = ds.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=float(alpha),
            min_partition_size=1, self_balancing=True, shuffle=True, seed=seed)
        partitioner.dataset = ds
    else:
        num_classes = len(set(_column(ds, "label")))
        if not 1 <= classes_per_partition <= num_classes:
            raise DataError(f"classes_per_partition must be between 1 and the number of "
                             f"classes present ({num_classes}), got {classes_per_partition}")
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
        partitioner.dataset = ds

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = [partitioner.load_partition(i) for i in range(num_partitions)]
        except ValueError as err:
            if scheme == "dirichlet" and "max number of attempts" in str(err):
                empty = _empty_dirichlet_partitions(ds, num_partitions, float(alpha), seed)
                raise DataError(
                    f"dirichlet partitioning (alpha={alpha}) of {len(ds)} examples into "
                    f"{num_partitions} partitions leaves some partitions empty (e.g. partition"
                    f"{'s' if len(empty) > 1 else ''} {_short_list(empty)}) even after 10 "
                    "redraws; use a larger alpha or fewer clients") from None
            raise DataError(f"{scheme} partitioning failed: {err}") from None
    for w in caught:
        if scheme == "pathological" and "will NOT be used" in str(w.message):
            warnings.warn(f"pathological partitioning with {num_partitions} partitions x "
                          f"{classes_per_partition} classes leaves some classes to no client; "
                          "their examples are not used", UserWarning, stacklevel=2)
        elif not (scheme == "dirichlet" and "min_partition_size" in str(w.message)):
            warnings.warn(w.message, w.category, stacklevel=2)  # pass on anything unexpected
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"partition {i} of {num_partitions} is empty ({scheme}); use a "
                             "larger alpha or fewer clients")
    return parts


def _empty_dirichlet_partitions(ds: datasets.Dataset, num_partitions: int, alpha: float,
                                seed: int) -> list[int]:
    from flwr_datasets.partitioner import DirichletPartitioner

    probe = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                 alpha=alpha, min_partition_size=0, self_balancing=True,
                                 seed=seed)
    probe.dataset = ds
    return [i for i in range(num_partitions) if len(probe.load_partition(i)) == 0]


def _short_list(values: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def label_counts(parts: Sequence[datasets.Dataset], num_labels: int) -> list[list[int]]:
    """Examples per label for each partition: `counts[client][label]`."""
    out = []
    for i, part in enumerate(parts):
        labels = np.asarray(_column(part, "label"), dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise DataError(f"partition {i} has labels outside 0..{num_labels - 1}")
        out.append(np.bincount(labels, minlength=num_labels).tolist())
    return out


def format_label_table(counts: Sequence[Sequence[int]], label_names: Sequence[str], *,
                       max_rows: int = 20) -> str:
    """A fixed-width table: one row per client, a column per label, plus totals.

    With more than `max_rows` clients, only the first `max_rows // 2` are shown, followed by a
    line saying how many were left out and a summary of client sizes.
    """
    names = [str(n) for n in label_names]
    if any(len(row) != len(names) for row in counts):
        raise DataError(f"every row of counts needs {len(names)} entries (one per label)")
    totals = [sum(row) for row in counts]
    per_label = [sum(row[j] for row in counts) for j in range(len(names))]
    grand = sum(totals)
    # Each column is as wide as its name or its largest number (the "all" row holds those).
    widths = [max(len(n), len(str(v))) for n, v in zip(names + ["total"], per_label + [grand],
                                                         strict=True)]
    first = max(len("client"), len(str(len(counts) - 1)))

    def line(label: str, values: Sequence[Any]) -> str:
        return label.ljust(first) + "".join(f"  {v:>{w}}" for v, w in zip(values, widths,
                                                                           strict=True))

    head = line("client", names + ["total"])
    shown = len(counts) if len(counts) <= max_rows else max(max_rows // 2, 1)
    rows = [head, "-" * len(head)]
    rows += [line(str(i), [*counts[i], totals[i]]) for i in range(shown)]
    if shown < len(counts):
        rows.append(f"... {len(counts) - shown} more clients (of {len(counts)}); client sizes: "
                    f"min {min(totals)}, mean {grand / len(counts):.1f}, max {max(totals)}")
    rows += ["-" * len(head), line("all", [*per_label, grand])]
    return "\n".join(rows)
