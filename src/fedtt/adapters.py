"""Tensor-train adapter modules and their injection into any Hugging Face model by module names.

`TTLinear` is a linear layer whose weight is a TT matrix (cores are direct `nn.Parameter`
attributes `core_0..core_{d-1}`, so Opacus' per-sample hooks see them). `TTAdapter` is
LoRETTA's bottleneck `h + up(relu(down(h)))`. `inject_adapters` hangs one adapter on the output
of every target module through a forward hook (or, under `preset = "loretta"` on LLaMA, also on
the input of a module through a forward pre-hook), leaving every backbone parameter name as it
was; each adapter parameter name contains `ADAPTER_PREFIX`, the mark of adapter tensors.

Two presets (`AdapterConfig.preset`): "" is fedtt's own defaults (the fields as configured);
"loretta" is LoRETTA's published design (Yang et al., NAACL 2024), built from its description:
bottleneck 64, Gaussian cores, biases on both TT layers, ReLU, scale 1, its mode rule
(`loretta_modes`), BERT/RoBERTa adapters after the attention-output and FFN-output dense,
LLaMA adapters on the inputs of gate_proj and up_proj and the output of down_proj, and a
RoBERTa-style head's hidden x hidden dense as a TT layer. Its parameter counts reproduce
LoRETTA's figures exactly; see `LORETTA_PRESET`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtt import tt
from fedtt.errors import ConfigError

ADAPTER_PREFIX = "tt_"
ADAPTER_ATTR = ADAPTER_PREFIX + "adapter"

# Per-family placement, found from module names (never from model names).
BERT_TARGETS = [r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"]
LLAMA_MLP_TARGETS = [r"layers\.\d+\.mlp$"]
LLAMA_ATTN_TARGETS = [r"layers\.\d+\.self_attn\.o_proj$"]
HEAD_NAMES = ("classifier", "score")
# preset "loretta", LLaMA family: adapters on the MLP's inputs (pre-hook) and output.
LORETTA_LLAMA_INPUTS = [r"layers\.\d+\.mlp\.(gate_proj|up_proj)$"]
LORETTA_LLAMA_OUTPUTS = [r"layers\.\d+\.mlp\.down_proj$"]

PRESETS = ("", "loretta")
HEAD_POLICIES = ("train-and-send", "tensorize", "keep-local")
# The AdapterConfig fields preset "loretta" sets. A field left at its default takes this value;
# set to exactly this value is fine too; anything else is a ValueError (use preset "" to choose
# freely). rank, max_mode and train_norms stay the user's (LoRETTA: rank 5 for BERT-family and
# LLaMA-2-7B, 8 for LLaMA-2-13B; norms train). head "tensorize" means LoRETTA's: only a
# two-layer head's hidden x hidden dense becomes TT, the projection to the labels stays dense.
#
# Parameter accounting against LoRETTA's published figures (rank 5):
# - every adapter = cores of down (hidden x 64) + cores of up (64 x hidden) + down bias (64)
#   + up bias (hidden); both TT layers of an adapter have mirrored modes of equal count:
#   768 x 64 -> [8, 8, 12, 8, 8] and 64 x 768 -> [8, 8, 12, 8, 8], 780 cores each;
#   4096 x 64 -> [16, 16, 16, 4, 4, 4] and 64 x 4096 -> [4, 4, 4, 16, 16, 16].
# - RoBERTa-base, exact: 12 layers x 2 adapters x (780 + 780 + 64 + 768) = 57,408 adapter
#   parameters; LayerNorms (weight and bias) 2 per layer + the embeddings' = 25 x 1,536 =
#   38,400; head: dense 768 x 768 as TT [8, 8, 12, 12, 8, 8] (1,080) + its bias 768, dense
#   out_proj 768 x 2 + 2 = 1,538: 3,386. Total 99,194 (LoRETTA: ~0.10M), without LayerNorms
#   60,794 (LoRETTA: 0.061M).
# - LLaMA-2-7B: RMSNorm weights 2 per layer + the final one = 65 x 4,096 = 266,240, exact.
#   LoRETTA's 610,560 adapter parameters = 32 layers x 3 adapters x (1,100 + 1,100 + 64 +
#   4,096): it counts every inner TT rank as 5, also the one before (after) the lone last
#   (first) mode 4, where a rank above 4 only adds redundant parameters. `tt.tt_ranks` caps
#   that rank at 4 (exact aggregation and per-client ranks rely on that profile), so each
#   4096-wide TT layer has 1,076 cores and the model 605,952 adapter parameters (4,608 fewer,
#   same set of representable adapters). With the dense score head (4096 x 2, no bias):
#   605,952 + 266,240 + 8,192 = 880,384 trainable (LoRETTA: 0.88M).
LORETTA_PRESET: dict[str, object] = dict(
    bottleneck=64, init="gaussian", bias="both", targets=[], attention=False, head="tensorize")


class TTLinear(nn.Module):
    """y = x @ W + b with W (in x out) stored as TT cores; W is rebuilt by one einsum."""

    def __init__(self, in_features: int, out_features: int, rank: int, *,
                 bias: bool = True, init: str = "gaussian", max_mode: int = tt.DEFAULT_MAX_MODE,
                 generator: torch.Generator | None = None,
                 modes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if modes is None:
            self.modes = tt.matrix_modes(in_features, out_features, max_mode)
        else:
            self.modes = tuple(int(m) for m in modes)
            if math.prod(self.modes) != in_features * out_features or min(self.modes) < 1:
                raise ValueError(f"TT modes {list(self.modes)} do not multiply to "
                                 f"{in_features} x {out_features}")
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


def _split_into(n: int, parts: int, max_mode: int) -> tuple[int, ...]:
    """Factors of `n` (ascending) into `parts` modes <= `max_mode` with the least sum; the
    count is clamped to what `n` allows: at least `tt.factorize`'s fewest modes (a prime
    above `max_mode` stays one mode), at most one mode per prime factor."""
    if n == 1:
        return ()
    fewest = tt.factorize(n, max_mode)
    primes = tt._prime_factors(n)
    parts = min(max(parts, len(fewest)), len(primes))
    if parts == len(fewest):
        return fewest
    big = [p for p in primes if p > max_mode]
    rest = n // math.prod(big)
    # rest splits into any count between its fewest modes and its prime count (split a
    # composite mode in two and both halves stay <= max_mode), so this always succeeds.
    split = tt._best_split(rest, parts - len(big), max_mode)
    assert split is not None
    return tuple(sorted(split + tuple(big)))


def loretta_modes(in_features: int, out_features: int,
                  max_mode: int = tt.DEFAULT_MAX_MODE) -> tuple[int, ...]:
    """TT modes of an in x out weight under preset "loretta" (a rule, no table of sizes).

    1. The number of modes d makes the modes about 8 on average: d = round(log8(in * out))
       (halves round up).
    2. The larger side keeps `tt.factorize`'s split (fewest modes <= max_mode, least sum);
       the smaller side takes the remaining d - len(larger) modes (at least its own fewest,
       at most one per prime factor), least sum. Equal sides both keep `tt.factorize`'s.
    3. Order: the in-side modes ascending, then the out-side modes descending, so the largest
       modes meet in the middle and a down (h x 64) and an up (64 x h) layer get mirrored
       modes of equal parameter count.

    This reproduces LoRETTA's table: 768 x 64 -> [8, 8, 12, 8, 8] (d = 5), 4096 x 64 ->
    [16, 16, 16, 4, 4, 4] (d = 6). Its 5120 x 64 entry [5, 8, 8, 16, 8, 8] is matched on the
    64 side only: `tt.factorize` splits 5120 as [8, 8, 8, 10]. Other sizes: 384 x 64 ->
    [6, 8, 8, 8, 8], 576 x 64 -> [8, 8, 9, 8, 8], 1024 x 64 -> [8, 8, 16, 8, 8], 2048 x 64
    -> [8, 16, 16, 4, 4, 4]. (fedtt's own `tt.matrix_modes` instead puts the largest modes at
    the ends, which costs fewer parameters: 768 x 64 -> [12, 8, 8, 8, 8].)
    """
    if in_features < 1 or out_features < 1:
        raise ValueError(f"cannot factorize {in_features} x {out_features}")
    d = math.floor(math.log2(in_features * out_features) / 3 + 0.5)
    big_first = in_features >= out_features
    big_n, small_n = (in_features, out_features) if big_first else (out_features, in_features)
    big = tuple(m for m in tt.factorize(big_n, max_mode) if m > 1)
    small = _split_into(small_n, d - len(big), max_mode)
    ins, outs = (big, small) if big_first else (small, big)
    modes = tuple(sorted(ins)) + tuple(sorted(outs, reverse=True))
    return modes or (1,)


MODE_RULES = ("fedtt", "loretta")


class TTAdapter(nn.Module):
    """LoRETTA's bottleneck: h + up(relu(down(h))), down and up TT linear layers.

    `mode_rule`: "fedtt" (`tt.matrix_modes`, largest modes at the ends) or "loretta"
    (`loretta_modes`)."""

    def __init__(self, hidden: int, bottleneck: int, rank: int, *, bias: str = "both",
                 init: str = "gaussian", max_mode: int = tt.DEFAULT_MAX_MODE,
                 generator: torch.Generator | None = None, mode_rule: str = "fedtt") -> None:
        super().__init__()
        if bias not in ("none", "down", "both"):
            raise ValueError(f"adapter bias must be none, down or both, got {bias!r}")
        if mode_rule not in MODE_RULES:
            raise ValueError(f"mode_rule must be one of {MODE_RULES}, got {mode_rule!r}")
        loretta = mode_rule == "loretta"
        up_init = "zero-last" if init == "identity" else init
        down_init = "gaussian" if init == "identity" else init
        self.down = TTLinear(hidden, bottleneck, rank, bias=bias != "none", init=down_init,
                             max_mode=max_mode, generator=generator,
                             modes=loretta_modes(hidden, bottleneck, max_mode) if loretta
                             else None)
        self.up = TTLinear(bottleneck, hidden, rank, bias=bias == "both", init=up_init,
                           max_mode=max_mode, generator=generator,
                           modes=loretta_modes(bottleneck, hidden, max_mode) if loretta
                           else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


def _apply_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, ADAPTER_ATTR)(output)


def _apply_input_adapter(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module sees adapter(x) = x + up(relu(down(x))) as its input."""
    return (getattr(module, ADAPTER_ATTR)(args[0]), *args[1:])


@dataclass
class AdapterConfig:
    """Where TT adapters go and what besides them trains."""

    rank: int = field(default=5, metadata={
        "help": "TT rank of every inner core boundary.", "min": 1, "max": 1024})
    bottleneck: int = field(default=64, metadata={
        "help": "Adapter bottleneck width.", "min": 1, "max": 4096})
    targets: list[str] = field(default_factory=list, metadata={
        "help": "Regexes of module names whose output gets an adapter; empty = family default."})
    attention: bool = field(default=True, metadata={
        "help": "LLaMA family: also adapt the attention output (o_proj), not only the MLP."})
    init: str = field(default="identity", metadata={
        "help": "'identity' (up-projection's last core zero: adapter starts as the identity) "
                "or 'gaussian' (LoRETTA: every core Gaussian).",
        "choices": ("identity", "gaussian")})
    bias: str = field(default="both", metadata={
        "help": "Adapter biases: none, down or both.", "choices": ("none", "down", "both")})
    max_mode: int = field(default=tt.DEFAULT_MAX_MODE, metadata={
        "help": "Largest TT mode when factorising a dimension.", "min": 2})
    train_norms: bool = field(default=True, metadata={
        "help": "Train (and send) LayerNorm/RMSNorm weights."})
    head: str = field(default="train-and-send", metadata={
        "help": "Classification head: train-and-send, tensorize (TT layers, sent) or "
                "keep-local (trained, never sent).", "choices": HEAD_POLICIES})
    preset: str = field(default="", metadata={
        "help": "'' = fedtt's own defaults: every field as set here (adapters after the "
                "attention output and the MLP, identity init, modes with the largest at the "
                "ends, ...). 'loretta' = LoRETTA's published adapter: bottleneck 64, Gaussian "
                "init, biases on both TT layers, ReLU, scale 1, LoRETTA's modes (768x64 -> "
                "8,8,12,8,8; 4096x64 -> 16,16,16,4,4,4), BERT/RoBERTa: after the "
                "attention-output and FFN-output dense, LLaMA: on the inputs of gate_proj and "
                "up_proj and the output of down_proj (no attention adapter), and a RoBERTa-style "
                "head's hidden x hidden dense as TT (a single-linear head trains dense). It "
                "sets bottleneck, init, bias, targets, attention and head: a field left at its "
                "default takes the preset's value (64, gaussian, both, [], false, tensorize); "
                "setting one to anything else is an error (use preset '' to choose them). "
                "rank, max_mode and train_norms stay yours (LoRETTA: rank 5, 8 for "
                "LLaMA-2-13B). TT methods only; LoRA ignores it."})

    def validate(self) -> None:
        """The rules no single field's bounds express: the preset and the target regexes.
        (Each field's range or choices is declared in its metadata; `fedtt.config` checks
        them for every section.)"""
        if self.preset not in PRESETS:
            raise ValueError(f"adapter.preset must be '' (fedtt's own defaults) or 'loretta' "
                             f"(LoRETTA's published adapter), got {self.preset!r}")
        for i, pattern in enumerate(self.targets):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"adapter.targets[{i}] is not a valid regex ({exc}), "
                                 f"got {pattern!r}") from None
        if self.preset == "loretta":
            defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else f.default for f in dataclasses.fields(self)}
            clashes = [f"adapter.{k} = {getattr(self, k)!r}" for k, v in LORETTA_PRESET.items()
                       if getattr(self, k) not in (defaults[k], v)]
            if clashes:
                raise ValueError(
                    f"adapter.preset = 'loretta' sets {', '.join(LORETTA_PRESET)} itself; "
                    f"leave them at their defaults or at the preset's values "
                    f"({', '.join(f'{k} = {v!r}' for k, v in LORETTA_PRESET.items())}), or use "
                    f"adapter.preset = '' to choose them: got {', '.join(clashes)}")

    def resolved(self) -> AdapterConfig:
        """The effective settings (validated): a copy with the preset's values filled in.

        With preset "" that is an equal copy. The copy keeps `preset`, which also selects the
        preset's placement, mode rule and head treatment in `inject_adapters`."""
        self.validate()
        if self.preset == "loretta":
            values = {k: list(v) if isinstance(v, list) else v
                      for k, v in LORETTA_PRESET.items()}
            return dataclasses.replace(self, **values)
        return dataclasses.replace(self, targets=list(self.targets))



def default_targets(model: nn.Module, attention: bool = True) -> list[str]:
    """Placement regexes for a model's family, recognised from its module names."""
    names = [n for n, _ in model.named_modules()]
    if any(re.search(BERT_TARGETS[0], n) for n in names):
        return list(BERT_TARGETS)
    if any(re.search(LLAMA_MLP_TARGETS[0], n) for n in names):
        return LLAMA_MLP_TARGETS + (LLAMA_ATTN_TARGETS if attention else [])
    raise ConfigError(
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
    raise ConfigError(f"cannot find the output width of {type(module).__name__}; "
                     "target a Linear module or an MLP with a down_proj")


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, head
    return None


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def loretta_sites(model: nn.Module) -> list[tuple[str, str]]:
    """Preset "loretta": (regex, "input" | "output") placement, from module names.

    BERT/RoBERTa: the outputs of the attention-output and FFN-output dense (as fedtt's own
    default). LLaMA: the inputs of gate_proj and up_proj and the output of down_proj."""
    names = [n for n, _ in model.named_modules()]
    if any(re.search(BERT_TARGETS[0], n) for n in names):
        return [(p, "output") for p in BERT_TARGETS]
    if any(re.search(LORETTA_LLAMA_INPUTS[0], n) for n in names):
        return ([(p, "input") for p in LORETTA_LLAMA_INPUTS]
                + [(p, "output") for p in LORETTA_LLAMA_OUTPUTS])
    raise ConfigError(
        "adapter.preset = 'loretta' knows BERT/RoBERTa-style ('attention.output.dense') and "
        "LLaMA-style ('layers.N.mlp.gate_proj/up_proj/down_proj') models only; use "
        "adapter.preset = '' and set adapter.targets to regexes of module names")


def inject_adapters(model: nn.Module, cfg: AdapterConfig, *, seed: int = 0) -> list[str]:
    """Add a TT adapter after (or, preset "loretta" on LLaMA, before) every target module;
    freeze the backbone; set what trains.

    Returns the names of the adapted modules. Afterwards exactly the adapter parameters, the
    norms (if `cfg.train_norms`) and the head (unless frozen) require grad. `cfg` is applied
    through `cfg.resolved()`, so a preset's settings take effect; `cfg` itself is unchanged.
    """
    cfg = cfg.resolved()
    loretta = cfg.preset == "loretta"
    if loretta:
        sites = [(re.compile(p), where) for p, where in loretta_sites(model)]
    else:
        sites = [(re.compile(p), "output")
                 for p in (cfg.targets or default_targets(model, cfg.attention))]
    mode_rule = "loretta" if loretta else "fedtt"
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if ADAPTER_PREFIX in name:
            continue
        where = next((w for p, w in sites if p.search(name)), None)
        if where is None:
            continue
        width = _input_width(module) if where == "input" else _output_width(module)
        adapter = TTAdapter(width, cfg.bottleneck, cfg.rank, bias=cfg.bias, init=cfg.init,
                            max_mode=cfg.max_mode, generator=gen, mode_rule=mode_rule)
        ref = next(module.parameters(), None)
        if ref is not None and ref.device.type != "meta":
            adapter.to(ref.device)
        module.add_module(ADAPTER_ATTR, adapter)
        if where == "input":
            module.register_forward_pre_hook(_apply_input_adapter)
        else:
            module.register_forward_hook(_apply_adapter)
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"no module name matches adapter targets {[p.pattern for p, _ in sites]}")
    if cfg.train_norms:
        for name, module in model.named_modules():
            if is_norm(module) and ADAPTER_PREFIX not in name:
                module.requires_grad_(True)
    head = find_head(model)
    if head is not None:
        if cfg.head == "tensorize":
            if loretta:
                _tensorize_hidden(model, head[0], cfg, gen)
            else:
                _tensorize(model, head[0], cfg, gen)
        getattr(model, head[0]).requires_grad_(True)
    for name, p in model.named_parameters():
        if ADAPTER_PREFIX in name:
            p.requires_grad_(True)
    return adapted


def _input_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    raise ConfigError(f"an input adapter needs a Linear module, got {type(module).__name__}")


def _tensorize_hidden(model: nn.Module, head_name: str, cfg: AdapterConfig,
                      gen: torch.Generator) -> None:
    """Preset "loretta": every Linear of the head but the last (the projection to the labels)
    becomes a TTLinear with `loretta_modes`; e.g. RoBERTa's 768 x 768 `dense` turns TT while
    `out_proj` stays dense, and a single-linear head (BERT's, LLaMA's score) stays dense."""
    linears = [n for n, m in getattr(model, head_name).named_modules()
               if isinstance(m, nn.Linear)]
    for sub in linears[:-1]:
        path = f"{head_name}.{sub}"
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, leaf)
        layer = TTLinear(child.in_features, child.out_features, cfg.rank,
                         bias=child.bias is not None, max_mode=cfg.max_mode, generator=gen,
                         modes=loretta_modes(child.in_features, child.out_features,
                                             cfg.max_mode))
        if child.weight.device.type != "meta":
            layer.to(child.weight.device)
        setattr(parent, leaf, layer)


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
