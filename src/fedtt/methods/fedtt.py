"""FedTT (TT adapters, every trainable tensor travels) and FedTT+ (most TT cores frozen per round).

FedTT+'s freezing is a server-side policy: each round it picks, for every TT layer, the cores
that train (first, last, and one intermediate core), which the round's message names (a bit
mask over the travelling tensors); the other cores stay frozen on every client and never
travel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedtt import tt
from fedtt.adapters import inject_adapters
from fedtt.methods.base import Method, Replies, fedavg

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


class FedTT(Method):
    """TT adapters (plus norms and head, as configured); FedAvg of every travelling tensor."""

    name = "fedtt"

    def build(self, model: nn.Module, *, seed: int = 0) -> nn.Module:
        inject_adapters(model, self.adapter, seed=seed)
        return model

    def aggregate(self, server_round: int, current: Mapping[str, torch.Tensor],
                  replies: Replies) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """FedAvg; with `exact`, each TT layer's cores are replaced by the TT-SVD rounding
        of the average of the clients' rebuilt tensors, which also admits clients of lower
        TT ranks (their replies carry smaller cores).

        Logs `aggregation_gap`: how far the applied aggregate's rebuilt tensors lie from the
        average of the clients' rebuilt tensors, relative to the round's update (that
        average minus the current tensors), over every TT layer the replies carry."""
        groups = core_groups(list(current))
        cores_of = {c for cores in groups.values() for c in cores}
        mixed = any(t.shape != current[n].shape for state, _ in replies
                    for n, t in state.items() if n in cores_of)
        if mixed and self.cfg.aggregation != "exact":
            raise ValueError("replies of different TT ranks need method.aggregation = 'exact'")
        new = fedavg([({n: t for n, t in state.items() if not (mixed and n in cores_of)}, w)
                      for state, w in replies])
        error, update = 0.0, 0.0
        for cores in groups.values():
            if not any(c in replies[0][0] for c in cores):
                continue
            target = _average_full(current, replies, cores)
            if self.cfg.aggregation == "exact":
                modes = [current[c].shape[1] for c in cores]
                rank = max(current[c].shape[2] for c in cores)
                rounded = tt.pad_cores(tt.tt_svd(target, modes, rank), rank)
                for c, value in zip(cores, rounded, strict=True):
                    new[c] = value.to(current[c].dtype)
            applied = tt.tt_to_full([new.get(c, current[c]) for c in cores]).to(torch.float64)
            before = tt.tt_to_full([current[c] for c in cores]).to(torch.float64)
            error += float((applied - target).pow(2).sum())
            update += float((target - before).pow(2).sum())
        if update == 0.0:
            return new, {}
        return new, {"aggregation_gap": math.sqrt(error / update)}


def _average_full(current: Mapping[str, torch.Tensor], replies: Replies,
                  cores: list[str]) -> torch.Tensor:
    """Example-weighted average of each client's rebuilt TT tensor (missing cores: global)."""
    total = float(sum(w for _, w in replies))
    acc = None
    for state, w in replies:
        full = tt.tt_to_full([state.get(c, current[c]) for c in cores]).to(torch.float64)
        acc = full * (w / total) if acc is None else acc + full * (w / total)
    return acc


class FreezePolicy:
    """Chooses each round which cores of each TT layer train; the rest stay frozen.

    `fixed`: first, middle and last core every round. `round-robin`: first and last, plus an
    intermediate core that rotates with the round. `adaptive`: first and last, plus the
    intermediate core with the largest (relative update norm when it last trained) x (rounds
    since it last trained); cores never trained yet come first.
    """

    NAMES = ("fixed", "round-robin", "adaptive")

    def __init__(self, name: str) -> None:
        if name not in self.NAMES:
            raise ValueError(f"method.policy must be one of {self.NAMES}, got {name!r}")
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


class FedTTPlus(FedTT):
    """FedTT with most cores frozen each round by a server-side `FreezePolicy`."""

    name = "fedtt+"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.cfg.aggregation != "factor":
            raise ValueError("fedtt+ needs method.aggregation = 'factor': exact aggregation "
                             "rewrites every core, frozen ones included")
        self.policy = FreezePolicy(self.cfg.policy)

    def round_names(self, server_round: int, sent: Sequence[str]) -> list[str]:
        groups = core_groups(sent)
        in_groups = {c for cores in groups.values() for c in cores}
        trained = set(self.policy.choose(server_round, groups))
        return [n for n in sent if n not in in_groups or n in trained]

    def planned_round_names(self, server_round: int, sent: Sequence[str],
                            numel: Mapping[str, int]) -> tuple[list[str], bool]:
        groups = core_groups(sent)
        in_groups = {c for cores in groups.values() for c in cores}
        trained, bound = self.policy.planned(server_round, groups, numel)
        return [n for n in sent if n not in in_groups or n in set(trained)], bound

    def aggregate(self, server_round: int, current: Mapping[str, torch.Tensor],
                  replies: Replies) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        new, metrics = super().aggregate(server_round, current, replies)
        self.policy.observe(server_round, current, new)
        return new, metrics

    def state(self) -> dict:
        return {"policy": self.policy.state()}

    def load_state(self, state: Mapping) -> None:
        self.policy.load_state(state["policy"])
