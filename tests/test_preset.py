"""`adapter.preset`: "" keeps fedtt's own defaults bit for bit; "loretta" is LoRETTA's design.

Published figures (LoRETTA, Yang et al., NAACL 2024, rank 5): RoBERTa-base adapters 57,408,
LayerNorms 38,400, ~0.10M with LayerNorm and tensorized classifier, 0.061M without LayerNorm;
LLaMA-2-7B adapters 610,560, norms 266,240 (0.88M). The accounting is in
`fedtt.adapters.LORETTA_PRESET`. Every figure is reproduced exactly except LLaMA-2-7B's
adapters: LoRETTA counts every inner TT rank as 5, also the last one, whose right side is a
single mode of 4 (a rank above 4 there adds only redundant parameters); fedtt's `tt.tt_ranks`
caps it at 4 (exact aggregation and per-client ranks rely on that profile), so each 4096 x 64
TT layer has 1,076 cores instead of 1,100 and the model 605,952 adapter parameters
(96 adapters x 2 layers x 24 = 4,608 fewer). Counted uncapped, our modes give 610,560.
"""

import hashlib
import math
import re

import pytest
import torch
from torch import nn

from fedtt import tt
from fedtt.adapters import (
    ADAPTER_ATTR,
    ADAPTER_PREFIX,
    LORETTA_PRESET,
    AdapterConfig,
    TTAdapter,
    TTLinear,
    inject_adapters,
    loretta_modes,
)
from fedtt.config import ConfigError, load_config, to_toml
from fedtt.methods import core_groups, make_method
from fedtt.methods.fedtt import FedTTConfig
from fedtt.models import load_model, load_tokenizer
from fedtt.plan import plan

TINY = ["arch:tiny-bert", "arch:tiny-roberta", "arch:tiny-llama"]
HEAD = re.compile(r"(^|\.)(classifier|score)\.")


def build(arch, method="fedtt", num_labels=3, **adapter):
    m = make_method(method, AdapterConfig(**adapter))
    return m.build(load_model(arch, num_labels, seed=0), seed=0), m


def split_counts(model):
    """(adapter, norm, head) trainable parameter counts."""
    adapter = norms = head = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ADAPTER_PREFIX in n:
            adapter += p.numel()
        elif HEAD.search(n):
            head += p.numel()
        else:
            assert re.search(r"(LayerNorm|norm)\.", n), n
            norms += p.numel()
    return adapter, norms, head


# --- the mode rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape, modes", [
    ((768, 64), (8, 8, 12, 8, 8)),            # LoRETTA's table
    ((64, 768), (8, 8, 12, 8, 8)),            # its up-projection: same modes, same count
    ((4096, 64), (16, 16, 16, 4, 4, 4)),      # LoRETTA's table
    ((64, 4096), (4, 4, 4, 16, 16, 16)),
    ((768, 768), (8, 8, 12, 12, 8, 8)),       # RoBERTa's head dense
    ((384, 64), (6, 8, 8, 8, 8)), ((576, 64), (8, 8, 9, 8, 8)),
    ((1024, 64), (8, 8, 16, 8, 8)), ((2048, 64), (8, 16, 16, 4, 4, 4)),
])
def test_loretta_modes(shape, modes):
    assert loretta_modes(*shape) == modes


def test_loretta_modes_5120_matches_on_the_bottleneck_side():
    # LoRETTA lists [5, 8, 8, 16, 8, 8]; tt.factorize splits 5120 as 8, 8, 8, 10
    assert loretta_modes(5120, 64) == (8, 8, 8, 10, 8, 8)


@pytest.mark.parametrize("n", [2, 32, 384, 576, 769, 1024, 2048, 4096, 5120, 11008, 13824])
@pytest.mark.parametrize("b", [2, 7, 64, 96])
def test_loretta_modes_are_a_valid_tt_matrix_layout_for_any_size(n, b):
    for rows, cols in ((n, b), (b, n)):
        modes = loretta_modes(rows, cols)
        assert math.prod(modes) == rows * cols
        # the leading modes multiply to exactly `rows` (in-side first, then out-side)
        assert rows in {math.prod(modes[:i]) for i in range(len(modes) + 1)}
        for m in modes:  # above the cap only an unsplittable prime
            assert m <= tt.DEFAULT_MAX_MODE or all(m % p for p in range(2, int(m**0.5) + 1))
        layer = TTLinear(rows, cols, 5, modes=modes)
        assert layer.full_weight().shape == (rows, cols)


def test_default_modes_are_unchanged():
    assert TTAdapter(768, 64, 5).down.modes == tt.matrix_modes(768, 64) == (12, 8, 8, 8, 8)
    assert TTAdapter(768, 64, 5, mode_rule="loretta").down.modes == (8, 8, 12, 8, 8)


def test_explicit_modes_must_fit():
    with pytest.raises(ValueError, match="do not multiply"):
        TTLinear(768, 64, 5, modes=(8, 8, 12, 8))


# --- config: validation, resolution, config system --------------------------------------------

def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="adapter.preset must be '' .* or 'loretta'"):
        AdapterConfig(preset="LoRETTA").validate()


@pytest.mark.parametrize("override", [
    dict(init="identity"), dict(init="gaussian"), dict(bottleneck=64), dict(bias="both"),
    dict(attention=False), dict(head="tensorize"), dict(targets=[]),
    dict(rank=8), dict(max_mode=8), dict(train_norms=False)])
def test_preset_accepts_defaults_its_own_values_and_free_fields(override):
    AdapterConfig(preset="loretta", **override).validate()


@pytest.mark.parametrize("override, key", [
    (dict(bottleneck=32), "bottleneck"), (dict(bias="down"), "bias"),
    (dict(targets=[r"mlp$"]), "targets"), (dict(head="keep-local"), "head")])
def test_preset_rejects_conflicting_overrides(override, key):
    with pytest.raises(ValueError, match=f"adapter.preset = 'loretta' sets .*adapter.{key} ="):
        AdapterConfig(preset="loretta", **override).validate()


def test_resolved():
    assert AdapterConfig().resolved() == AdapterConfig()
    cfg = AdapterConfig(preset="loretta", rank=8)
    got = cfg.resolved()
    assert cfg == AdapterConfig(preset="loretta", rank=8)  # unchanged
    assert got.rank == 8 and got.preset == "loretta"
    assert {k: getattr(got, k) for k in LORETTA_PRESET} == LORETTA_PRESET
    assert got.resolved() == got


def test_preset_in_the_run_config():
    cfg = load_config(None, ['adapter.preset="loretta"'])
    assert cfg.adapter.preset == "loretta"
    assert 'preset = "loretta"' in to_toml(cfg)
    assert load_config(None, []).adapter.preset == ""
    with pytest.raises(ConfigError, match="adapter.preset"):
        load_config(None, ['adapter.preset="lora"'])
    with pytest.raises(ConfigError, match="adapter.head"):
        load_config(None, ['adapter.preset="loretta"', 'adapter.head="keep-local"'])


# --- preset "": nothing changes -----------------------------------------------------------------

# A regression pin, on purpose: the committed evidence (results/) was run with the defaults as
# they were before presets existed, and preset "" must rebuild them bit for bit (fedtt, seed 0,
# 3 labels). Adapter tensors: 2 layers x 2 sites x (4 + 4 cores + 2 biases) = 40; adapter
# numel: 4 x (380 + 380 + 64 + 32) = 3,424, a TT matrix 32 <-> 64 at rank 5 with modes
# (8, 4, 8, 8) (up: 8, 8, 4, 8) holding 1*8*5 + 5*4*5 + 5*8*5 + 5*8*1 = 380; the trainable
# numel adds each model's norms and head. The names' digest and the sum of |adapter values|
# for each init were taken from that code: they pin the order of parameters and of the draws.
BEFORE = {
    "arch:tiny-bert": (40, 3424, 3843, "cd34fc59acfcef32"),
    "arch:tiny-roberta": (40, 3424, 4899, "8a4d28eb0493e202"),
    "arch:tiny-llama": (40, 3424, 3680, "1d593c92c2fef404"),
}
ABS_SUM = {"identity": 698.9696168587398, "gaussian": 736.1185372472828}


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("init", ["identity", "gaussian"])
def test_empty_preset_reproduces_the_old_defaults(arch, init):
    model, _ = build(arch, init=init, preset="")
    params = dict(model.named_parameters())
    adapters = [n for n in params if ADAPTER_PREFIX in n]
    n_tensors, numel, trainable, digest = BEFORE[arch]
    assert len(adapters) == n_tensors
    assert sum(params[n].numel() for n in adapters) == numel
    assert sum(p.numel() for p in params.values() if p.requires_grad) == trainable
    assert hashlib.sha256("\n".join(adapters).encode()).hexdigest()[:16] == digest
    total = sum(float(params[n].detach().double().abs().sum()) for n in adapters)
    assert total == pytest.approx(ABS_SUM[init], rel=1e-9)
    base = [n for n, _ in load_model(arch, 3).named_parameters()]
    assert [n for n in params if ADAPTER_PREFIX not in n] == base


# --- preset "loretta": counts against LoRETTA's figures ------------------------------------------

def test_roberta_base_counts_match_loretta_exactly():
    model, _ = build("arch:roberta-base", num_labels=2, preset="loretta")
    adapter, norms, head = split_counts(model)
    assert adapter == 57_408  # 24 x (780 + 780 + 64 + 768)
    assert norms == 38_400    # 25 LayerNorms x (768 + 768)
    assert head == 3_386      # TT dense 1,080 + bias 768, dense out_proj 768 x 2 + 2
    assert isinstance(model.classifier.dense, TTLinear)
    assert model.classifier.dense.modes == (8, 8, 12, 12, 8, 8)
    assert isinstance(model.classifier.out_proj, nn.Linear)
    with_norms = plan("arch:roberta-base", ["fedtt"], AdapterConfig(preset="loretta"))
    without = plan("arch:roberta-base", ["fedtt"],
                   AdapterConfig(preset="loretta", train_norms=False))
    # LoRETTA's table: about 0.10M with the norms, 0.061M without
    assert with_norms["methods"]["fedtt"]["trainable_params"] == 99_194
    assert without["methods"]["fedtt"]["trainable_params"] == 60_794
    assert with_norms["methods"]["fedtt"]["trainable_params"] - without["methods"]["fedtt"][
        "trainable_params"] == norms


def test_llama_2_7b_counts_against_loretta():
    model, _ = build("arch:llama-2-7b", num_labels=2, preset="loretta")
    adapter, norms, head = split_counts(model)
    assert norms == 266_240   # 65 RMSNorms x 4096: exact
    assert head == 8_192      # dense score 4096 x 2, no bias
    assert adapter == 605_952  # LoRETTA: 610,560, see the module docstring
    layers = [m for n, m in model.named_modules() if isinstance(m, TTLinear)]
    assert len(layers) == 32 * 3 * 2
    assert {m.modes for m in layers} == {(16, 16, 16, 4, 4, 4), (4, 4, 4, 16, 16, 16)}
    # LoRETTA's counting: every inner rank 5, no boundary cap -> exactly its figure
    def uncapped(modes, r=5):
        ranks = [1] + [r] * (len(modes) - 1) + [1]
        return sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(modes))

    assert uncapped((16, 16, 16, 4, 4, 4)) == 1_100 and tt.tt_param_count(
        (16, 16, 16, 4, 4, 4), 5) == 1_076
    biases = sum(m.bias.numel() for m in layers)
    assert biases == 96 * (64 + 4096)
    assert sum(uncapped(m.modes) for m in layers) + biases == 610_560
    assert adapter == 610_560 - 96 * 2 * 24
    result = plan("arch:llama-2-7b", ["fedtt"], AdapterConfig(preset="loretta"))
    assert result["methods"]["fedtt"]["trainable_params"] == 605_952 + 266_240 + 8_192


def test_bert_base_single_linear_head_stays_dense():
    model, _ = build("arch:bert-base", num_labels=2, preset="loretta")
    assert split_counts(model) == (57_408, 38_400, 768 * 2 + 2)
    assert isinstance(model.classifier, nn.Linear)


# --- preset "loretta": placement and training on tiny models ------------------------------------

def test_llama_placement_inputs_of_gate_and_up_output_of_down():
    base = [n for n, _ in load_model("arch:tiny-llama", 3).named_parameters()]
    model, method = build("arch:tiny-llama", preset="loretta")
    sites = sorted(n for n, m in model.named_modules() if isinstance(m, TTAdapter))
    assert sites == sorted(f"model.layers.{i}.mlp.{p}.{ADAPTER_ATTR}" for i in range(2)
                           for p in ("gate_proj", "up_proj", "down_proj"))
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if ADAPTER_PREFIX not in n] == base
    added = [n for n in names if n not in base]
    assert added and all(ADAPTER_PREFIX in n for n in added)
    groups = core_groups(method.sent_names(model))
    assert len(groups) == 2 * 3 * 2
    for layer, cores in groups.items():
        module = model.get_submodule(layer)
        assert dict(module.named_parameters(recurse=False)).keys() >= {
            c.rsplit(".", 1)[1] for c in cores}
    assert isinstance(model.score, nn.Linear)  # single-linear head: trained dense


def test_llama_input_adapter_feeds_the_projection():
    model, _ = build("arch:tiny-llama", preset="loretta")
    mlp = model.model.layers[0].mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    mlp.gate_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("gate", out))
    mlp.down_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("down", (a[0], out)))
    enc = load_tokenizer("arch:tiny-llama")(["a good movie"], max_length=8)
    with torch.no_grad():
        model(**enc)
        x = seen["x"]
        adapter = getattr(mlp.gate_proj, ADAPTER_ATTR)
        shifted = x + adapter.up(torch.relu(adapter.down(x)))
        assert not torch.allclose(shifted, x)
        assert torch.allclose(seen["gate"], nn.functional.linear(shifted, mlp.gate_proj.weight))
        h, out = seen["down"]
        dense = nn.functional.linear(h, mlp.down_proj.weight)
        assert torch.allclose(out, getattr(mlp.down_proj, ADAPTER_ATTR)(dense))


@pytest.mark.parametrize("arch", ["arch:tiny-bert", "arch:tiny-roberta"])
def test_bert_family_placement_is_unchanged(arch):
    model, _ = build(arch, preset="loretta")
    sites = [n for n, m in model.named_modules() if isinstance(m, TTAdapter)]
    assert len(sites) == 2 * 2
    assert all(re.search(r"(attention\.output\.dense|layer\.\d+\.output\.dense)\.tt_adapter$", n)
               for n in sites)
    head_tt = [n for n, m in model.named_modules() if isinstance(m, TTLinear)
               and n.startswith("classifier")]
    assert head_tt == (["classifier.dense"] if "roberta" in arch else [])


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("method", ["fedtt", "fedtt+"])
def test_loretta_forward_backward(arch, method):
    model, m = build(arch, method, preset="loretta")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc = load_tokenizer(arch)(["a good movie", "bad and dull film", "fine", "great fun"],
                               max_length=16)
    labels = torch.tensor([0, 1, 2, 0])
    base = load_model(arch, 3, seed=0).eval()
    with torch.no_grad():  # Gaussian init: the adapters change the output from the start
        assert not torch.allclose(model.eval()(**enc).logits, base(**enc).logits)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(**enc).logits, labels)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in trainable if ".core_" in n)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n
    sent = set(m.sent_names(model))
    assert {n for n, _ in trainable} == sent  # head, norms and adapters all travel


def test_loretta_norms_flag_and_lora_ignores_preset():
    model, _ = build("arch:tiny-llama", preset="loretta", train_norms=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    lora, _ = build("arch:tiny-bert", "lora", preset="loretta")
    assert not any(ADAPTER_PREFIX in n for n, _ in lora.named_parameters())


def test_loretta_needs_a_known_family():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="preset = 'loretta' knows"):
        inject_adapters(model, AdapterConfig(preset="loretta"))


def test_loretta_cores_survive_exact_aggregation():
    model, _ = build("arch:tiny-llama", preset="loretta")
    method = make_method("fedtt", AdapterConfig(preset="loretta"),
                         FedTTConfig(aggregation="exact"))
    params = dict(model.named_parameters())
    current = {n: params[n].detach().clone() for n in method.sent_names(model)}
    g = torch.Generator().manual_seed(1)
    replies = [({n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in current.items()}, w)
               for w in (3.0, 5.0)]
    new, _ = method.aggregate(1, current, replies)
    assert {n: t.shape for n, t in new.items()} == {n: t.shape for n, t in current.items()}
