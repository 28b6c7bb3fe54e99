"""Federated LoRA and FFA-LoRA baselines, built with peft.

LoRA: FedAvg of A and B (and the head). FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at
its seeded random init on every client, so only B (and the head) train and travel, which also
makes the average of the products B A exact.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedtt.adapters import is_norm
from fedtt.errors import ConfigError
from fedtt.methods.base import HEAD_PARAM, Method
from fedtt.methods.lora.config import LoRAConfig

BERT_LORA_TARGETS = ["query", "value"]
LLAMA_LORA_TARGETS = ["q_proj", "v_proj"]


def default_lora_targets(model: nn.Module) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for targets in (BERT_LORA_TARGETS, LLAMA_LORA_TARGETS):
        if set(targets) <= leaves:
            return list(targets)
    raise ConfigError("cannot find query/value projections (query,value or q_proj,v_proj) in "
                     "this model; set lora.targets")


class LoRA(Method):
    name = "lora"
    section = "lora"
    Config = LoRAConfig
    prefixes = ("lora_",)
    renamed = {"method.lora_rank": "rank", "method.lora_alpha": "alpha",
               "method.lora_targets": "targets"}

    @property
    def label(self) -> str:
        return f"LoRA r={self.cfg.rank}"

    def build(self, model: nn.Module, *, seed: int = 0) -> nn.Module:
        if self.adapter.head == "tensorize":
            raise ConfigError("adapter.head = 'tensorize' is for TT methods; "
                             "use train-and-send or keep-local with LoRA")
        targets = self.cfg.targets or default_lora_targets(model)
        torch.manual_seed(seed)  # peft draws A from the global generator
        config = LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha,
                            target_modules=targets, lora_dropout=0.0, bias="none")
        with warnings.catch_warnings():  # peft reads a property transformers deprecated
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            model = get_peft_model(model, config)
        for name, p in model.named_parameters():
            if HEAD_PARAM.search(name):
                p.requires_grad_(True)
        if self.cfg.train_norms:
            for module in model.modules():
                if is_norm(module):
                    module.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """B A folded into each adapted weight (peft's merge_and_unload)."""
        return model.merge_and_unload()


class FFALoRA(LoRA):
    name = "ffa-lora"

    @property
    def label(self) -> str:
        return f"FFA-LoRA r={self.cfg.rank}"

    def build(self, model: nn.Module, *, seed: int = 0) -> nn.Module:
        model = super().build(model, seed=seed)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
        return model
