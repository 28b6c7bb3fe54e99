"""Federated LoRA and FFA-LoRA (peft): the `[lora]` section and the two methods."""

from fedtt.methods.lora.config import LoRAConfig
from fedtt.methods.lora.method import FFALoRA, LoRA, default_lora_targets

__all__ = ["FFALoRA", "LoRA", "LoRAConfig", "default_lora_targets"]
