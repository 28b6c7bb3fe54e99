"""The interface every federated fine-tuning method implements, and example-weighted FedAvg.

A method says three things: what it makes trainable in a model (`build`), which tensors a
client trains and uploads in a given round (`round_names`), and how the server combines the
clients' tensors (`aggregate`). The runtime does everything else the same way for all methods.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtt.adapters import HEAD_NAMES, AdapterConfig

HEAD_PARAM = re.compile(r"(^|\.)(" + "|".join(HEAD_NAMES) + r")\.")


@dataclass
class MethodConfig:
    """Which method runs, and its method-specific knobs."""

    name: str = field(default="fedtt", metadata={
        "help": "fedtt, fedtt+, lora or ffa-lora."})
    aggregation: str = field(default="factor", metadata={
        "help": "fedtt: 'factor' averages each TT core; 'exact' averages the rebuilt matrices "
                "and rounds back to rank r by TT-SVD.", "choices": ("factor", "exact")})
    policy: str = field(default="round-robin", metadata={
        "help": "fedtt+: which intermediate core trains with the first and last each round: "
                "fixed, round-robin or adaptive."})
    lora_rank: int = field(default=8, metadata={
        "help": "lora/ffa-lora: rank r.", "min": 1, "max": 4096})
    lora_alpha: int = field(default=16, metadata={
        "help": "lora/ffa-lora: scaling alpha.", "min": 1})
    lora_targets: list[str] = field(default_factory=list, metadata={
        "help": "lora/ffa-lora: module names to adapt; empty = query,value (BERT) or "
                "q_proj,v_proj (LLaMA)."})


Replies = Sequence[tuple[Mapping[str, torch.Tensor], float]]


class Method:
    """Base class; subclasses override `build` and, where they differ, the round hooks."""

    name: str = ""

    def __init__(self, cfg: MethodConfig, adapter: AdapterConfig) -> None:
        self.cfg, self.adapter = cfg, adapter

    def build(self, model: nn.Module, *, seed: int = 0) -> nn.Module:
        """Add this method's trainable tensors to `model`, freeze the rest, return the model."""
        raise NotImplementedError

    def sent_names(self, model: nn.Module) -> list[str]:
        """Every tensor that ever travels: the trainable ones, minus a keep-local head."""
        keep_local = self.adapter.head == "keep-local"
        return [n for n, p in model.named_parameters()
                if p.requires_grad and not (keep_local and HEAD_PARAM.search(n))]

    def round_names(self, server_round: int, sent: Sequence[str]) -> list[str]:
        """Tensors clients train and upload in `server_round` (server side decides)."""
        return list(sent)

    def planned_round_names(self, server_round: int, sent: Sequence[str],
                            numel: Mapping[str, int]) -> tuple[list[str], bool]:
        """What `fedtt plan` expects clients to upload in `server_round` of a fresh run, and
        whether that is only an upper bound (a choice that depends on the training)."""
        return self.round_names(server_round, sent), False

    def aggregate(self, server_round: int, current: Mapping[str, torch.Tensor],
                  replies: Replies) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """New global values for the tensors in the replies, plus metrics to log."""
        return fedavg(replies), {}

    def state(self) -> dict:
        """Server-side state that a resumed run needs (plain containers; none by default)."""
        return {}

    def load_state(self, state: Mapping) -> None:
        """Restore what `state` returned."""


def fedavg(replies: Replies) -> dict[str, torch.Tensor]:
    """Example-weighted average of every tensor the replies carry (all must carry the same)."""
    if not replies:
        raise ValueError("no replies to aggregate")
    names = list(replies[0][0])
    for state, _ in replies[1:]:
        if list(state) != names:
            raise ValueError("replies carry different tensors; cannot average")
    total = float(sum(w for _, w in replies))
    if total <= 0:
        raise ValueError("the replies' example counts sum to zero")
    out = {}
    for name in names:
        acc = torch.zeros_like(replies[0][0][name], dtype=torch.float64)
        for state, w in replies:
            acc += state[name].to(torch.float64) * (w / total)
        out[name] = acc.to(replies[0][0][name].dtype)
    return out
