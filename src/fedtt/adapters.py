"""Tensor-train adapter modules and their injection into any Hugging Face model by module names.

`TTLinear` is a linear layer whose weight is a TT matrix (cores are direct `nn.Parameter`
attributes `core_0..core_{d-1}`, so Opacus' per-sample hooks see them). `TTAdapter` is
LoRETTA's bottleneck `h + up(relu(down(h)))`. `inject_adapters` hangs one adapter on the output
of every target module through a forward hook, leaving every backbone parameter name as it
was; each adapter parameter name contains `ADAPTER_PREFIX`, the mark of adapter tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtt import tt

ADAPTER_PREFIX = "tt_"
ADAPTER_ATTR = ADAPTER_PREFIX + "adapter"

# Per-family placement, found from module names (never from model names).
BERT_TARGETS = [r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"]
LLAMA_MLP_TARGETS = [r"layers\.\d+\.mlp$"]
LLAMA_ATTN_TARGETS = [r"layers\.\d+\.self_attn\.o_proj$"]
HEAD_NAMES = ("classifier", "score")


class TTLinear(nn.Module):
    """y = x @ W + b with W (in x out) stored as TT cores; W is rebuilt by one einsum."""

    def __init__(self, in_features: int, out_features: int, rank: int, *,
                 bias: bool = True, init: str = "gaussian", max_mode: int = tt.DEFAULT_MAX_MODE,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.modes = tt.matrix_modes(in_features, out_features, max_mode)
        target_std = math.sqrt(1.0 / (in_features + out_features))
        if init not in ("gaussian", "zero-last"):
            raise ValueError(f"unknown TT init {init!r}: use 'gaussian' or 'zero-last'")
        cores = tt.init_cores(self.modes, rank, target_std, zero_last=init == "zero-last",
                              generator=generator)
        self.num_cores = len(cores)
        for i, core in enumerate(cores):
            setattr(self, f"core_{i}", nn.Parameter(core))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core_{i}") for i in range(self.num_cores)]

    def full_weight(self) -> torch.Tensor:
        """The dense (in x out) weight the cores represent."""
        return tt.tt_to_matrix(self.cores(), self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.full_weight().to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, modes={self.modes}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class TTAdapter(nn.Module):
    """LoRETTA's bottleneck: h + up(relu(down(h))), down and up TT linear layers."""

    def __init__(self, hidden: int, bottleneck: int, rank: int, *, bias: str = "both",
                 init: str = "gaussian", max_mode: int = tt.DEFAULT_MAX_MODE,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if bias not in ("none", "down", "both"):
            raise ValueError(f"adapter bias must be none, down or both, got {bias!r}")
        up_init = "zero-last" if init == "identity" else init
        down_init = "gaussian" if init == "identity" else init
        self.down = TTLinear(hidden, bottleneck, rank, bias=bias != "none", init=down_init,
                             max_mode=max_mode, generator=generator)
        self.up = TTLinear(bottleneck, hidden, rank, bias=bias == "both", init=up_init,
                           max_mode=max_mode, generator=generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


def _apply_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, ADAPTER_ATTR)(output)


@dataclass
class AdapterConfig:
    """Where TT adapters go and what besides them trains."""

    rank: int = field(default=5, metadata={"help": "TT rank of every inner core boundary."})
    bottleneck: int = field(default=64, metadata={"help": "Adapter bottleneck width."})
    targets: list[str] = field(default_factory=list, metadata={
        "help": "Regexes of module names whose output gets an adapter; empty = family default."})
    attention: bool = field(default=True, metadata={
        "help": "LLaMA family: also adapt the attention output (o_proj), not only the MLP."})
    init: str = field(default="identity", metadata={
        "help": "'identity' (up-projection's last core zero: adapter starts as the identity) "
                "or 'gaussian' (LoRETTA: every core Gaussian)."})
    bias: str = field(default="both", metadata={"help": "Adapter biases: none, down or both."})
    max_mode: int = field(default=tt.DEFAULT_MAX_MODE, metadata={
        "help": "Largest TT mode when factorising a dimension."})
    train_norms: bool = field(default=True, metadata={
        "help": "Train (and send) LayerNorm/RMSNorm weights."})
    head: str = field(default="train-and-send", metadata={
        "help": "Classification head: train-and-send, tensorize (TT layers, sent) or "
                "keep-local (trained, never sent)."})

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter.rank must be >= 1, got {self.rank}")
        if self.bottleneck < 1:
            raise ValueError(f"adapter.bottleneck must be >= 1, got {self.bottleneck}")
        if self.init not in ("identity", "gaussian"):
            raise ValueError(f"adapter.init must be identity or gaussian, got {self.init!r}")
        if self.bias not in ("none", "down", "both"):
            raise ValueError(f"adapter.bias must be none, down or both, got {self.bias!r}")
        if self.head not in HEAD_POLICIES:
            raise ValueError(f"adapter.head must be one of {HEAD_POLICIES}, got {self.head!r}")


HEAD_POLICIES = ("train-and-send", "tensorize", "keep-local")


def default_targets(model: nn.Module, attention: bool = True) -> list[str]:
    """Placement regexes for a model's family, recognised from its module names."""
    names = [n for n, _ in model.named_modules()]
    if any(re.search(BERT_TARGETS[0], n) for n in names):
        return list(BERT_TARGETS)
    if any(re.search(LLAMA_MLP_TARGETS[0], n) for n in names):
        return LLAMA_MLP_TARGETS + (LLAMA_ATTN_TARGETS if attention else [])
    raise ValueError(
        "cannot tell where adapters go in this model (neither BERT-style "
        "'attention.output.dense' nor LLaMA-style 'layers.N.mlp' modules found); "
        "set adapter.targets to regexes of module names")


def _output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    for attr in ("down_proj", "fc2", "dense"):  # an MLP block: its last projection
        sub = getattr(module, attr, None)
        if isinstance(sub, nn.Linear):
            return sub.out_features
    raise ValueError(f"cannot find the output width of {type(module).__name__}; "
                     "target a Linear module or an MLP with a down_proj")


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, head
    return None


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def inject_adapters(model: nn.Module, cfg: AdapterConfig, *, seed: int = 0) -> list[str]:
    """Add a TT adapter after every target module; freeze the backbone; set what trains.

    Returns the names of the adapted modules. Afterwards exactly the adapter parameters, the
    norms (if `cfg.train_norms`) and the head (unless frozen) require grad.
    """
    cfg.validate()
    patterns = [re.compile(p) for p in (cfg.targets or default_targets(model, cfg.attention))]
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if ADAPTER_PREFIX in name or not any(p.search(name) for p in patterns):
            continue
        width = _output_width(module)
        adapter = TTAdapter(width, cfg.bottleneck, cfg.rank, bias=cfg.bias, init=cfg.init,
                            max_mode=cfg.max_mode, generator=gen)
        ref = next(module.parameters(), None)
        if ref is not None and ref.device.type != "meta":
            adapter.to(ref.device)
        module.add_module(ADAPTER_ATTR, adapter)
        module.register_forward_hook(_apply_adapter)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"no module name matches adapter targets {[p.pattern for p in patterns]}")
    if cfg.train_norms:
        for name, module in model.named_modules():
            if is_norm(module) and ADAPTER_PREFIX not in name:
                module.requires_grad_(True)
    head = find_head(model)
    if head is not None:
        if cfg.head == "tensorize":
            _tensorize(model, head[0], cfg, gen)
        getattr(model, head[0]).requires_grad_(True)
    for name, p in model.named_parameters():
        if ADAPTER_PREFIX in name:
            p.requires_grad_(True)
    return adapted


def _tensorize(parent: nn.Module, name: str, cfg: AdapterConfig, gen: torch.Generator) -> None:
    """Replace every Linear at or below `parent.name` by a TTLinear of the same shape."""
    child = getattr(parent, name)
    if isinstance(child, nn.Linear):
        setattr(parent, name, TTLinear(child.in_features, child.out_features, cfg.rank,
                                       bias=child.bias is not None, max_mode=cfg.max_mode,
                                       generator=gen))
        return
    for sub in list(child._modules):
        _tensorize(child, sub, cfg, gen)


def tt_layers(model: nn.Module) -> dict[str, TTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TTLinear)}
