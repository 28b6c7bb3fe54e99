"""A run's model from its config, built the same way by the runtime and by export/predict.

The frozen backbone is loaded on the run's device in `model.dtype` (a classification model,
with `model.head = "verbalizer"` the causal LM wrapped in `VerbalizerLM`, and for a causal-lm
task the causal LM itself, whose LM head predicts the response), the method adds
its tensors, and every trainable or method-owned tensor is made float32 (the master copies).
`encode` tokenises a split for that model: plain texts, or prompts for the verbalizer head.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fedtt.config import RunConfig, task_kind
from fedtt.devices import CPU, Compute, float32_trainables
from fedtt.errors import ConfigError
from fedtt.methods import Method
from fedtt.models import load_model
from fedtt.train import Encoded
from fedtt.train import encode as encode_texts
from fedtt.verbalizer import Verbalizer, VerbalizerLM


def verbalizer_for(cfg: RunConfig, tokenizer, label_names: Sequence[str]) -> Verbalizer | None:
    """The run's verbalizer (template, words, token ids), or None for a classifier head."""
    if cfg.model.head != "verbalizer":
        return None
    return Verbalizer.build(tokenizer, label_names, cfg.model.template, cfg.model.verbalizers)


def build_model(cfg: RunConfig, method: Method, num_labels: int, *,
                verbalizer: Verbalizer | None = None, compute: Compute = CPU) -> nn.Module:
    """The backbone on `compute`'s device and dtype with `method`'s tensors (float32)."""
    seed = cfg.training.seed
    device = None if compute.device.type == "cpu" else compute.device
    generative = task_kind(cfg) == "causal-lm"
    base = load_model(cfg.model.name, num_labels, seed=seed, meta=False, dtype=compute.dtype,
                      device=device, causal=verbalizer is not None or generative,
                      generative=generative)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and cfg.model.max_length > positions:
        raise ConfigError(f"model.max_length {cfg.model.max_length} is more than the "
                          f"{positions} positions {cfg.model.name} has")
    model = method.build(base, seed=seed)
    if compute.mixed:
        float32_trainables(model, method.owns)
    if verbalizer is not None:
        model = VerbalizerLM(model, verbalizer.label_ids)
    return model


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int,
           verbalizer: Verbalizer | None = None) -> Encoded:
    """Tokenised examples for the run's model (prompts under the verbalizer head)."""
    if verbalizer is None:
        return encode_texts(tokenizer, texts, labels, max_length)
    return verbalizer.encode(tokenizer, texts, labels, max_length)
