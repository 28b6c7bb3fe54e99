"""What every part of `fedtt.data` shares: the `TaskData` every loader returns, the error it
raises (`DataError`), the column schemas (`FEATURES` for classification, `PAIR_FEATURES` for
causal-lm prompt/response pairs), and the seeded, stratified train/test split that both
built-in tasks and a user's own files go through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np


class DataError(ValueError):
    """A data file, task or partition setting that cannot be used; the message names it."""


FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
# causal-lm: a prompt, its response, and a category (`label`) that partitioning may skew by.
PAIR_FEATURES = datasets.Features({"prompt": datasets.Value("string"),
                                   "response": datasets.Value("string"),
                                   "label": datasets.Value("int64")})
KINDS = ("classification", "causal-lm")


@dataclass
class TaskData:
    """A task's train/test splits and label names. Classification: columns `text`, `label`.
    causal-lm (`kind`): columns `prompt`, `response` and `label`, a category index into
    `label_names` that partitioning can skew by (a single "all" category when there is none)."""

    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]
    kind: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _dataset(texts: Sequence[str], labels: Sequence[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts), "label": [int(v) for v in labels]},
                                      features=FEATURES)


def _pairs(prompts: Sequence[str], responses: Sequence[str],
           labels: Sequence[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": list(prompts), "response": list(responses),
                                       "label": [int(v) for v in labels]},
                                      features=PAIR_FEATURES)


def _column(ds: datasets.Dataset, name: str) -> list[Any]:
    """One column as a plain list (`ds[name]` is a lazy Column object in datasets 4)."""
    return ds.select_columns([name])[:][name]


def _split(texts: Sequence[str], labels: Sequence[int], test_fraction: float,
           seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded train/test split; stratified by label when every class has >= 2 rows."""
    train, test = _split_indices(labels, test_fraction, seed)

    def take(idx: np.ndarray) -> datasets.Dataset:
        return _dataset([texts[i] for i in idx], [labels[i] for i in idx])

    return take(train), take(test)


def _split_pairs(prompts: Sequence[str], responses: Sequence[str], labels: Sequence[int],
                 test_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """`_split` for prompt/response pairs, stratified by their category."""
    train, test = _split_indices(labels, test_fraction, seed)

    def take(idx: np.ndarray) -> datasets.Dataset:
        return _pairs([prompts[i] for i in idx], [responses[i] for i in idx],
                      [labels[i] for i in idx])

    return take(train), take(test)


def _split_indices(labels: Sequence[int], test_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of a seeded split, stratified when every class has >= 2."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(labels)
    if n < 2:
        raise DataError(f"need at least 2 rows to split into train and test, got {n}")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    classes = np.unique(y)
    if all((y == c).sum() >= 2 for c in classes):
        test_idx: list[int] = []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            k = min(max(round(test_fraction * len(idx)), 1), len(idx) - 1)
            test_idx.extend(idx[:k].tolist())
        chosen = np.zeros(n, dtype=bool)
        chosen[test_idx] = True
        test = rng.permutation(np.flatnonzero(chosen))
        train = rng.permutation(np.flatnonzero(~chosen))
    else:
        order = rng.permutation(n)
        k = min(max(round(test_fraction * n), 1), n - 1)
        test, train = order[:k], order[k:]
    return train, test
