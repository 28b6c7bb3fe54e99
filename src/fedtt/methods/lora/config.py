"""The `[lora]` config section: LoRA's and FFA-LoRA's settings (passed to peft)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRAConfig:
    """LoRA and FFA-LoRA: rank, scaling and the modules they adapt."""

    rank: int = field(default=8, metadata={"help": "Rank r.", "min": 1, "max": 4096})
    alpha: int = field(default=16, metadata={"help": "Scaling alpha.", "min": 1})
    targets: list[str] = field(default_factory=list, metadata={
        "help": "Module names to adapt; empty = query,value (BERT) or q_proj,v_proj (LLaMA)."})
    train_norms: bool = field(default=False, metadata={
        "help": "Also train (and send) the backbone's LayerNorm/RMSNorm weights, as the TT "
                "methods do with adapter.train_norms (a control with the same trained set)."})
