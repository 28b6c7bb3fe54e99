"""FedTT+'s freezing policy: which cores of each TT layer train in a round (the rest stay frozen
on every client and never travel)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedtt.methods.fedtt.config import POLICIES
from fedtt.methods.fedtt.cores import CORE


class FreezePolicy:
    """Chooses each round which cores of each TT layer train; the rest stay frozen.

    `fixed`: first, middle and last core every round. `round-robin`: first and last, plus an
    intermediate core that rotates with the round. `adaptive`: first and last, plus the
    intermediate core with the largest (relative update norm when it last trained) x (rounds
    since it last trained); cores never trained yet come first.
    """

    def __init__(self, name: str) -> None:
        if name not in POLICIES:
            raise ValueError(f"fedtt.policy must be one of {POLICIES}, got {name!r}")
        self.name = name
        self.last_trained: dict[str, int] = {}
        self.rel_update: dict[str, float] = {}

    def choose(self, server_round: int, groups: Mapping[str, list[str]]) -> list[str]:
        chosen = []
        for cores in groups.values():
            d = len(cores)
            if d <= 3:
                chosen += cores
                continue
            if self.name == "fixed":
                mid = d // 2
            elif self.name == "round-robin":
                mid = 1 + (server_round - 1) % (d - 2)
            else:
                mid = max(range(1, d - 1), key=lambda i: (self._score(cores[i], server_round), -i))
            chosen += [cores[0], cores[mid], cores[-1]]
        return chosen

    def planned(self, server_round: int, groups: Mapping[str, list[str]],
                numel: Mapping[str, int]) -> tuple[list[str], bool]:
        """`choose` as far as it is known before training, and whether it is a bound.

        `adaptive` trains every intermediate core once first (round r: the r-th), which is
        certain; after that its choice follows the update norms, and the layer's largest
        intermediate core stands in for it (an upper bound on the bytes)."""
        if self.name != "adaptive":
            return self.choose(server_round, groups), False
        chosen, bound = [], False
        for cores in groups.values():
            if len(cores) <= 3:
                chosen += cores
            elif server_round <= len(cores) - 2:
                chosen += [cores[0], cores[server_round], cores[-1]]
            else:
                chosen += [cores[0], max(cores[1:-1], key=lambda c: numel[c]), cores[-1]]
                bound = True
        return chosen, bound

    def _score(self, core: str, server_round: int) -> float:
        if core not in self.last_trained:
            return math.inf
        return self.rel_update[core] * (server_round - self.last_trained[core])

    def observe(self, server_round: int, old: Mapping[str, torch.Tensor],
                new: Mapping[str, torch.Tensor]) -> None:
        for name, value in new.items():
            if CORE.match(name):
                base = float(old[name].norm())
                self.rel_update[name] = float((value - old[name]).norm()) / (base + 1e-12)
                self.last_trained[name] = server_round

    def state(self) -> dict:
        return {"last_trained": dict(self.last_trained), "rel_update": dict(self.rel_update)}

    def load_state(self, state: Mapping) -> None:
        self.last_trained = dict(state["last_trained"])
        self.rel_update = dict(state["rel_update"])
