"""Tiny synthetic text data for tests and smoke runs (`data.task = "synthetic"`): learnable
from a few keywords per label, the same for the same seed, and needing nothing fetched."""

from __future__ import annotations

import random

import datasets

from fedtt.data.common import DataError, TaskData, _dataset

_KEYWORDS = [
    ["terrible", "awful", "dreadful", "horrible"],
    ["excellent", "wonderful", "delightful", "superb"],
    ["quantum", "electron", "molecule", "photon"],
    ["football", "tennis", "goalkeeper", "stadium"],
    ["election", "senate", "minister", "ballot"],
    ["guitar", "melody", "orchestra", "chorus"],
]
_FILLER = ("the", "a", "this", "was", "quite", "and", "it", "of", "very", "really", "we", "saw",
           "one", "thing", "about", "today", "then", "some", "more", "with")


def synthetic_task(n_train: int = 64, n_test: int = 32, num_labels: int = 2,
                   seed: int = 0) -> TaskData:
    """Tiny, learnable text data: each sentence mixes 2-3 keywords of its label with shared
    filler words. Labels are balanced (round robin, then shuffled); same seed, same data."""
    if num_labels < 2:
        raise DataError(f"num_labels must be >= 2, got {num_labels}")
    if n_train < 1 or n_test < 1:
        raise DataError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    keywords = [_KEYWORDS[j] if j < len(_KEYWORDS) else [f"topic{j}word{i}" for i in range(4)]
                for j in range(num_labels)]
    rng = random.Random(seed)

    def make(n: int) -> datasets.Dataset:
        labels = [i % num_labels for i in range(n)]
        rng.shuffle(labels)
        texts = []
        for label in labels:
            words = rng.choices(keywords[label], k=rng.randint(2, 3))
            words += rng.choices(_FILLER, k=rng.randint(3, 6))
            rng.shuffle(words)
            texts.append(" ".join(words))
        return _dataset(texts, labels)

    names = ["negative", "positive"] if num_labels == 2 else [f"class{j}" for j in
                                                             range(num_labels)]
    return TaskData("synthetic", make(n_train), make(n_test), names)
