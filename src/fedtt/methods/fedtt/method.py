"""FedTT (TT adapters, every trainable tensor travels) and FedTT+ (most TT cores frozen per round).

FedTT+'s freezing is a server-side policy (`freeze.py`): each round it picks, for every TT
layer, the cores that train (first, last, and one intermediate core), which the round's
message names (a bit mask over the travelling tensors); the other cores stay frozen on every
client and never travel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedtt import tt
from fedtt.adapters import ADAPTER_PREFIX, inject_adapters
from fedtt.methods.base import Method, Replies, fedavg
from fedtt.methods.fedtt.config import FedTTConfig
from fedtt.methods.fedtt.cores import core_groups
from fedtt.methods.fedtt.freeze import FreezePolicy


class FedTT(Method):
    """TT adapters (plus norms and head, as configured); FedAvg of every travelling tensor."""

    name = "fedtt"
    section = "fedtt"
    Config = FedTTConfig
    renamed = {"method.aggregation": "aggregation", "method.policy": "policy",
               "federation.client_ranks": "client_ranks"}

    @property
    def label(self) -> str:
        return f"FedTT rank {self.adapter.rank}"

    def owns(self, name: str) -> bool:
        return name.startswith(ADAPTER_PREFIX) or f".{ADAPTER_PREFIX}" in name

    def checks(self, run: Any) -> list[tuple[str, bool, str]]:
        ranks = self.cfg.client_ranks
        if not ranks:
            return []
        return [
            ("fedtt.client_ranks", all(r <= self.adapter.rank for r in ranks),
             f"must lie between 1 and adapter.rank = {self.adapter.rank} (the global "
             "adapter's rank)"),
            ("fedtt.aggregation", self.cfg.aggregation == "exact",
             "must be exact when fedtt.client_ranks is set (factors of different ranks "
             "cannot be averaged)"),
        ]

    @property
    def accepts_client_ranks(self) -> bool:
        return self.cfg.aggregation == "exact"

    @property
    def aggregates_by_mean(self) -> bool:
        """Factor averaging is a weighted mean; exact aggregation (TT-SVD of the averaged
        matrices) needs each client's cores."""
        return self.cfg.aggregation == "factor" and not self.cfg.client_ranks

    def client_rank(self, partition_id: int) -> int | None:
        ranks = self.cfg.client_ranks
        return ranks[partition_id % len(ranks)] if ranks else None

    def build(self, model: nn.Module, *, seed: int = 0) -> nn.Module:
        inject_adapters(model, self.adapter, seed=seed)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise ValueError(f"{self.name} cannot be merged: a TT adapter is a bottleneck "
                         "x + up(relu(down(x))) inserted after a block, not a change of a "
                         "weight matrix, so no plain model computes the same function")

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
            raise ValueError("replies of different TT ranks need fedtt.aggregation = 'exact'")
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


class FedTTPlus(FedTT):
    """FedTT with most cores frozen each round by a server-side `FreezePolicy`."""

    name = "fedtt+"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cfg.aggregation != "factor":
            raise ValueError("fedtt+ needs fedtt.aggregation = 'factor': exact aggregation "
                             "rewrites every core, frozen ones included")
        self.policy = FreezePolicy(self.cfg.policy)

    @property
    def label(self) -> str:
        return f"FedTT+ rank {self.adapter.rank}"

    def checks(self, run: Any) -> list[tuple[str, bool, str]]:
        return [("fedtt.client_ranks", not self.cfg.client_ranks,
                 "is for fedtt (exact aggregation); fedtt+ trains every client at "
                 "adapter.rank, so leave it empty")]

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
