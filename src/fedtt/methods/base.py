"""The interface every federated fine-tuning method implements, and example-weighted FedAvg.

A method is a folder under `methods/` (its config section, its model-building, its round
hooks) plus one line in the registry (`methods/__init__.py`). It says what it makes trainable
in a model (`build`), which tensors it owns (`owns`), which tensors a client trains and
uploads in a given round (`round_names`), how the server combines the clients' tensors
(`aggregate`), whether it can be merged into the backbone (`merge`), and, optionally, what
per-client ranks it accepts. The runtime, strategy, export and config ask these hooks and
never test a method's name; docs/extending.md walks through adding one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedtt.adapters import HEAD_NAMES, AdapterConfig

HEAD_PARAM = re.compile(r"(^|\.)(" + "|".join(HEAD_NAMES) + r")\.")


@dataclass
class MethodConfig:
    """Which method runs; its own settings live in the method's section (see `Method`)."""

    name: str = field(default="fedtt", metadata={
        "help": "fedtt, fedtt+, lora or ffa-lora (any registered method, see "
                "docs/extending.md)."})


Replies = Sequence[tuple[Mapping[str, torch.Tensor], float]]


class Method:
    """Base class; subclasses override `build` and, where they differ, the other hooks.

    Class attributes: `name` (what `method.name` selects), `section` and `Config` (the TOML
    section this method reads and its dataclass, fields with defaults and help as in
    `fedtt.config`; methods may share one), `prefixes` (substrings that mark the tensors
    the method adds to a model), `renamed` (old dotted config keys -> the key in `section`
    that replaced them, so the error can say so)."""

    name: str = ""
    section: str = ""
    Config: type | None = None
    prefixes: tuple[str, ...] = ()
    renamed: Mapping[str, str] = {}

    def __init__(self, cfg: Any = None, adapter: AdapterConfig | None = None) -> None:
        """`cfg`: this method's section (default: its defaults); `adapter`: the TT adapter
        and head settings (`[adapter]`)."""
        if cfg is None and self.Config is not None:
            cfg = self.Config()
        self.cfg, self.adapter = cfg, adapter or AdapterConfig()

    @property
    def label(self) -> str:
        """How reports name this method with its main setting, e.g. "LoRA r=8"."""
        return self.name

    def checks(self, run: Any) -> list[tuple[str, bool, str]]:
        """(dotted key, holds?, what it must be) rules tying this method's section to the
        rest of the run config (`run`, a `RunConfig`); `RunConfig.validate` raises on the
        first that fails. Rules of the method alone may raise ValueError in `__init__`."""
        return []

    def owns(self, name: str) -> bool:
        """Whether tensor `name` is one this method added to the model (trained or not)."""
        return any(p in name for p in self.prefixes)

    def merge(self, model: nn.Module) -> nn.Module:
        """The model with the method's tensors folded into the backbone's weights; a
        ValueError saying why when the method cannot be merged."""
        raise ValueError(f"{self.name} cannot be merged into the backbone")

    @property
    def accepts_client_ranks(self) -> bool:
        """Whether clients may train at their own (lower) ranks and declare them."""
        return False

    def client_rank(self, partition_id: int) -> int | None:
        """The rank the config gives the client of `partition_id` (None: the model's)."""
        return None

    @property
    def aggregates_by_mean(self) -> bool:
        """Whether `aggregate` of replies that all carry the same tensors at the global
        shapes is their weighted mean, so it can be given that mean as a single reply:
        what secure aggregation, where the server learns only the sum, needs."""
        return True

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
