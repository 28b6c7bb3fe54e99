"""Adapter injection and the four methods on tiny BERT, RoBERTa and LLaMA configs."""

import re

import pytest
import torch

from fedtt.adapters import (
    ADAPTER_PREFIX,
    AdapterConfig,
    TTAdapter,
    TTLinear,
    default_targets,
    inject_adapters,
    tt_layers,
)
from fedtt.methods import METHODS as REGISTRY
from fedtt.methods import make_method
from fedtt.methods.lora import LoRAConfig
from fedtt.models import load_model, load_tokenizer

ARCHS = ["arch:tiny-bert", "arch:tiny-roberta", "arch:tiny-llama"]
METHODS = list(REGISTRY)  # every registered method
NORM = re.compile(r"(LayerNorm|norm)\.")
HEAD = re.compile(r"(^|\.)(classifier|score)\.")


def build(arch, method, **adapter):
    model = load_model(arch, 3, seed=0)
    m = make_method(method, AdapterConfig(**adapter))
    return m.build(model, seed=0), m


def batch(arch, n=4):
    tok = load_tokenizer(arch)
    texts = ["a good movie", "bad and dull film here", "fine", "the plot was great fun"][:n]
    enc = tok(texts, max_length=16)
    return enc, torch.tensor([0, 1, 2, 0][:n])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_only_method_tensors_train(arch, method):
    model, _ = build(arch, method)
    for name, p in model.named_parameters():
        expected = (
            ADAPTER_PREFIX in name or bool(HEAD.search(name))
            or (method.startswith("fedtt") and bool(NORM.search(name)))
            or "lora_B" in name or (method == "lora" and "lora_A" in name))
        assert p.requires_grad == expected, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_training_step_moves_trainables_and_keeps_backbone_bit_identical(arch, method):
    model, _ = build(arch, method, init="gaussian")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc, labels = batch(arch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-12)
    for _ in range(2):  # two steps: LoRA's B (and a zero-init last core) start at zero
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            moved += not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), f"backbone tensor {name} changed"
    trainable = sum(p.requires_grad for p in model.parameters())
    assert moved == trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_init_reproduces_base_model(arch):
    base = load_model(arch, 3, seed=0).eval()
    model, _ = build(arch, "fedtt", init="identity")
    enc, _ = batch(arch)
    with torch.no_grad():
        assert torch.equal(model.eval()(**enc).logits, base(**enc).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_gaussian_init_changes_outputs(arch):
    base = load_model(arch, 3, seed=0).eval()
    model, _ = build(arch, "fedtt", init="gaussian")
    enc, _ = batch(arch)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(**enc).logits, base(**enc).logits)


@pytest.mark.parametrize("arch, expected", [
    ("arch:tiny-bert", 2 * 2), ("arch:tiny-roberta", 2 * 2), ("arch:tiny-llama", 2 * 2)])
def test_default_placement_from_module_names(arch, expected):
    model, _ = build(arch, "fedtt")
    adapters = [n for n, m in model.named_modules() if isinstance(m, TTAdapter)]
    assert len(adapters) == expected  # 2 layers x 2 sites


def test_llama_attention_adapter_is_optional():
    model, _ = build("arch:tiny-llama", "fedtt", attention=False)
    names = [n for n, m in model.named_modules() if isinstance(m, TTAdapter)]
    assert names and all(n.endswith("mlp." + ADAPTER_PREFIX + "adapter") for n in names)


def test_unknown_architecture_needs_explicit_targets():
    with pytest.raises(ValueError, match="adapter.targets"):
        default_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_explicit_targets_and_no_match_error():
    model = load_model("arch:tiny-bert", 2)
    with pytest.raises(ValueError, match="no module name matches"):
        inject_adapters(model, AdapterConfig(targets=[r"nothing_here$"]))


@pytest.mark.parametrize("head, sent_head, head_is_tt", [
    ("train-and-send", True, False), ("keep-local", False, False), ("tensorize", True, True)])
def test_head_policies(head, sent_head, head_is_tt):
    model, method = build("arch:tiny-roberta", "fedtt", head=head)
    sent = method.sent_names(model)
    head_names = [n for n, _ in model.named_parameters() if HEAD.search(n)]
    assert head_names and all((n in sent) == sent_head for n in head_names)
    assert any(isinstance(m, TTLinear) for n, m in model.named_modules()
               if n.startswith("classifier")) == head_is_tt


def test_norms_flag():
    model, _ = build("arch:tiny-bert", "fedtt", train_norms=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if NORM.search(n))


@pytest.mark.parametrize("arch", ["arch:tiny-bert", "arch:tiny-llama"])
@pytest.mark.parametrize("train_norms", [False, True])
def test_lora_trains_norms_only_when_asked(arch, train_norms):
    model = make_method("lora", cfg=LoRAConfig(train_norms=train_norms)).build(
        load_model(arch, 3, seed=0), seed=0)
    norms = [n for n, p in model.named_parameters() if NORM.search(n) and "lora_" not in n]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert norms and all((n in trained) == train_norms for n in norms)
    assert any("lora_B" in n for n in trained)


def test_building_lora_warns_about_nothing():
    """peft reads a property transformers deprecated; a user's `fedtt plan` or run must not
    print that FutureWarning once per LoRA build."""
    import warnings

    model = load_model("arch:tiny-bert", 3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_method("lora", cfg=LoRAConfig()).build(model, seed=0)


def test_lora_rejects_tensorized_head():
    with pytest.raises(ValueError, match="tensorize"):
        build("arch:tiny-bert", "lora", head="tensorize")


def test_tt_cores_are_direct_parameters():
    layer = TTLinear(48, 8, 3)
    direct = dict(layer.named_parameters(recurse=False))
    assert [f"core_{i}" for i in range(layer.num_cores)] == [n for n in direct if "core" in n]


@pytest.mark.parametrize("bias, count", [("none", 0), ("down", 1), ("both", 2)])
def test_adapter_bias_options(bias, count):
    adapter = TTAdapter(32, 8, 2, bias=bias)
    assert sum(1 for n, _ in adapter.named_parameters() if n.endswith("bias")) == count


def test_ffa_lora_sends_half_of_lora_adapter_bytes():
    lora, m_lora = build("arch:tiny-bert", "lora")
    ffa, m_ffa = build("arch:tiny-bert", "ffa-lora")
    size = lambda model, names: sum(  # noqa: E731
        dict(model.named_parameters())[n].numel() for n in names if "lora_" in n)
    assert size(ffa, m_ffa.sent_names(ffa)) * 2 == size(lora, m_lora.sent_names(lora))


def test_tt_layers_found():
    model, _ = build("arch:tiny-bert", "fedtt")
    assert len(tt_layers(model)) == 8  # 4 adapters x (down, up)
