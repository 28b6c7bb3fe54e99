"""Registry of federated fine-tuning methods: name -> class sharing the `Method` interface."""

from __future__ import annotations

from fedtt.adapters import AdapterConfig
from fedtt.methods.base import Method, MethodConfig, fedavg
from fedtt.methods.fedtt import FedTT, FedTTPlus, FreezePolicy, core_groups, largest_core_rank
from fedtt.methods.lora import FFALoRA, LoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedTT, FedTTPlus, LoRA, FFALoRA)}


def make_method(cfg: MethodConfig, adapter: AdapterConfig) -> Method:
    if cfg.name not in METHODS:
        raise ValueError(f"unknown method {cfg.name!r}: use one of {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg, adapter)


__all__ = ["METHODS", "FFALoRA", "FedTT", "FedTTPlus", "FreezePolicy", "LoRA", "Method",
           "MethodConfig", "core_groups", "fedavg", "largest_core_rank", "make_method"]
