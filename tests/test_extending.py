"""A method defined and registered in this file alone runs end to end: one class with its
own config section is all a new method needs (docs/extending.md walks through it)."""

from dataclasses import dataclass, field

import pytest
from helpers import read, tiny
from safetensors.torch import load_file
from torch import nn

from fedtt.config import ConfigError, describe, load_config, to_toml
from fedtt.export import export_run
from fedtt.federated.inprocess import run_inprocess
from fedtt.methods import METHODS, Method
from fedtt.methods.base import HEAD_PARAM


@dataclass
class BiasOnlyConfig:
    """BitFit-style tuning: the backbone's biases (and the head)."""

    norms: bool = field(default=False, metadata={"help": "Also train the norms' weights."})
    only: list[str] = field(default_factory=list, metadata={
        "help": "Train only biases whose names contain one of these; empty = all."})


class BiasOnly(Method):
    """Trains the frozen backbone's own biases plus the head; FedAvg of all of them."""

    name = "bias-only"
    section = "bias_only"
    Config = BiasOnlyConfig

    def build(self, model: nn.Module, *, seed: int = 0) -> nn.Module:
        for n, p in model.named_parameters():
            bias = n.endswith(".bias") and (not self.cfg.only or any(s in n for s in self.cfg.only))
            norm = self.cfg.norms and "norm" in n.lower()
            p.requires_grad_(bias or norm or bool(HEAD_PARAM.search(n)))
        return model


@pytest.fixture
def bias_only(monkeypatch):
    monkeypatch.setitem(METHODS, BiasOnly.name, BiasOnly)


def test_a_method_registered_from_a_test_file_runs_and_learns(tmp_path, bias_only):
    cfg = tiny(tmp_path, **{"method.name": "bias-only", "model.name": "arch:tiny-bert",
                            "bias_only.norms": True, "federation.rounds": 4})
    assert cfg.bias_only.norms is True and "[bias_only]\nnorms = true" in to_toml(cfg)
    summary = run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    assert summary["status"] == "completed" and summary["method"] == "bias-only"
    assert rounds[-1]["loss"] < rounds[0]["loss"]
    sent = {row["name"] for row in ledger if row["name"]}
    assert sent and all(n.endswith(".bias") or "norm" in n.lower() or HEAD_PARAM.search(n)
                        for n in sent)
    assert any("LayerNorm.weight" in n for n in sent)
    # The run's own config.toml reads back (its section included) while the method is known.
    again = load_config(tmp_path / "run" / "config.toml")
    assert again.bias_only == cfg.bias_only
    # Export asks the method whether it merges: the base class says no, and names it.
    with pytest.raises(ValueError, match="bias-only cannot be merged"):
        export_run(cfg.output.dir, tmp_path / "merged", merge=True)
    saved = load_file(str(export_run(cfg.output.dir, tmp_path / "export")
                          / "adapters.safetensors"))
    assert set(saved) == {n for n in sent}


def test_its_section_is_checked_and_described_like_any_other(tmp_path, bias_only):
    assert "[bias_only]  BitFit-style tuning" in describe()
    with pytest.raises(ConfigError, match="bias_only.norms must be true or false"):
        tiny(tmp_path, **{"method.name": "bias-only", "bias_only.norms": "yes"})
    with pytest.raises(ConfigError, match="unknown config key bias_only.rank"):
        tiny(tmp_path, **{"method.name": "bias-only", "bias_only.rank": 2})


def test_an_unregistered_method_and_its_section_are_unknown(tmp_path):
    with pytest.raises(ConfigError, match="method.name must be one of"):
        tiny(tmp_path, **{"method.name": "bias-only"})
    with pytest.raises(ConfigError, match=r"unknown config section \[bias_only\]"):
        tiny(tmp_path, **{"bias_only.norms": True})
