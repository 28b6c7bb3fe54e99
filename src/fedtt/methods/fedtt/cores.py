"""TT cores by name: which parameters of a model are the cores of which TT layer."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

CORE = re.compile(r"^(?P<layer>.+)\.core_(?P<index>\d+)$")


def core_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """TT layer name -> its core tensor names in core order."""
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        m = CORE.match(name)
        if m:
            groups.setdefault(m["layer"], {})[int(m["index"])] = name
    return {layer: [idx[i] for i in sorted(idx)] for layer, idx in groups.items()}


def largest_core_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """The largest TT rank the given cores really have (0 if there are none): small modes can
    cap a layer's ranks below adapter.rank."""
    return max((tensors[c].shape[2] for cores in core_groups(list(tensors)).values()
                for c in cores), default=0)
