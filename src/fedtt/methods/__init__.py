"""Registry of federated fine-tuning methods: name -> class sharing the `Method` interface.

Adding a method is a folder beside `fedtt/` and `lora/` plus one line here (or, for a
method that lives elsewhere, `register(cls)`); see docs/extending.md.
"""

from __future__ import annotations

from typing import Any

from fedtt.adapters import AdapterConfig
from fedtt.methods.base import Method, MethodConfig, fedavg
from fedtt.methods.fedtt import FedTT, FedTTPlus, FreezePolicy, core_groups, largest_core_rank
from fedtt.methods.lora import FFALoRA, LoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedTT, FedTTPlus, LoRA, FFALoRA)}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under `cls.name` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def method_sections() -> dict[str, type]:
    """Config section name -> its dataclass, over every registered method (shared sections
    once; two methods may share a section only with the same dataclass)."""
    out: dict[str, type] = {}
    for cls in METHODS.values():
        if cls.section and cls.Config is not None:
            if out.setdefault(cls.section, cls.Config) is not cls.Config:
                raise ValueError(f"methods disagree on the dataclass of [{cls.section}]")
    return out


def make_method(name: str, adapter: AdapterConfig | None = None, cfg: Any = None) -> Method:
    """The method `name` with its section `cfg` (default: its defaults) and `adapter`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name](cfg, adapter)


__all__ = ["METHODS", "FFALoRA", "FedTT", "FedTTPlus", "FreezePolicy", "LoRA", "Method",
           "MethodConfig", "core_groups", "fedavg", "largest_core_rank", "make_method",
           "method_sections", "register"]
