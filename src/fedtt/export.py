"""Export a finished run's model, load it back, and predict with it.

Two formats, both plain directories:
- adapters (default): `adapters.safetensors` (every tensor the method added or trained, at its
  final global value) and `fedtt_export.json` (backbone spec, seed, label names and the run's
  config). `load_exported` rebuilds the frozen backbone from its spec and puts them back in.
- merged (`--merge`, LoRA and FFA-LoRA only): an ordinary Hugging Face model directory with
  B A folded into the weights and the trained head in place; any Hugging Face code loads it.
  A TT adapter cannot be merged: it is a bottleneck `x + up(relu(down(x)))`, not a linear
  change of a weight, so it is exported as adapters.

A causal-lm run (`kind` in the manifest) exports the same way (merged: a causal LM directory);
its `Predictor.generate` greedy-decodes prompts put into the run's chat template.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fedtt import backbone, causal_lm
from fedtt.config import RunConfig, apply, load_config, task_kind, to_toml
from fedtt.methods import Method
from fedtt.models import HashTokenizer, load_tokenizer
from fedtt.results import GLOBAL, LABELS, read_global, read_labels
from fedtt.verbalizer import Verbalizer

MANIFEST = "fedtt_export.json"
ADAPTERS = "adapters.safetensors"
FORMATS = ("adapters", "merged")
# What a manifest must hold, with the type of each entry.
MANIFEST_KEYS = {"format": str, "model": str, "label_names": list, "max_length": int,
                 "config": str}


class ExportError(ValueError):
    """A run that cannot be exported, or an export that cannot be loaded; says why."""


def _run_model(run_dir: Path) -> tuple[RunConfig, list[str], nn.Module]:
    """The run's model with its final global tensors loaded, its config and label names."""
    for needed in ("config.toml", GLOBAL, LABELS):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished fedtt run (no {needed})")
    cfg = load_config(str(run_dir / "config.toml"), [])
    if cfg.adapter.head == "keep-local":
        raise ExportError("this run kept each client's head on the client (adapter.head = "
                         "keep-local): there is no global model to export")
    labels = read_labels(run_dir)["label_names"]
    model = _build(cfg, labels)
    _load(model, read_global(run_dir))
    return cfg, labels, model


def _build(cfg: RunConfig, labels: list[str], tokenizer=None) -> nn.Module:
    """The run's model on the CPU, its backbone in float32 whatever `model.dtype` the run
    trained with (export and predict run anywhere)."""
    verbalizer = backbone.verbalizer_for(cfg, tokenizer or load_tokenizer(cfg.model.name),
                                         labels)
    return backbone.build_model(cfg, cfg.make_method(), len(labels),
                                verbalizer=verbalizer).eval()


def _load(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ExportError(f"tensors that this model lacks: {unknown[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _added(model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """Tensors the method added (trained or frozen, e.g. FFA-LoRA's A) or trained."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters()
            if p.requires_grad or method.owns(n)}


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False) -> Path:
    """Write the run's final model to `out` (see the module docstring); returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, labels, model = _run_model(run_dir)
    method = cfg.make_method()
    if merge and cfg.model.head == "verbalizer":
        raise ExportError("a run with model.head = 'verbalizer' scores labels with the LM "
                          "head, which a merged sequence-classification model cannot do. "
                          "Export without --merge (adapters plus a loader: fedtt predict "
                          "reads them).")
    if merge:
        try:
            plain = method.merge(model)
        except ValueError as exc:
            raise ExportError(f"{exc}. Export without --merge (adapters plus a loader: "
                              "fedtt predict reads them).") from None
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "merged" if merge else "adapters", "model": cfg.model.name,
                "method": cfg.method.name, "seed": cfg.training.seed, "label_names": labels,
                "max_length": cfg.model.max_length, "run": str(run_dir.resolve()),
                "config": to_toml(cfg)}
    generative = task_kind(cfg) == "causal-lm"
    if generative:  # label_names: the task's categories, which predict does not use
        manifest.update(kind="causal-lm", max_new_tokens=cfg.model.max_new_tokens)
    if merge:
        if not generative:
            plain.config.id2label = dict(enumerate(labels))
            plain.config.label2id = {name: i for i, name in enumerate(labels)}
        plain.save_pretrained(out)
        tok = load_tokenizer(cfg.model.name)
        if isinstance(tok, HashTokenizer):
            manifest["tokenizer"] = {"hash": tok.vocab_size}
        else:
            tok.save_pretrained(out)
    else:
        save_file(_added(model, method), str(out / ADAPTERS))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@dataclass
class Predictor:
    """A loaded model with its tokenizer and label names (a causal-lm model: `kind`, and its
    chat template; it generates instead of labelling)."""

    model: nn.Module
    tokenizer: object
    label_names: list[str]
    max_length: int
    verbalizer: Verbalizer | None = None  # model.head = "verbalizer": prompts, LM-head scores
    kind: str = "classification"
    max_new_tokens: int = 32

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """causal-lm: greedy continuations of `prompts` in the run's chat template."""
        if self.kind != "causal-lm":
            raise ExportError("this model is a classifier: it labels texts, it does not "
                              "generate")
        return causal_lm.generate(self.model, self.tokenizer,
                                  causal_lm.ChatFormat.build(self.tokenizer), prompts,
                                  max_new_tokens=max_new_tokens or self.max_new_tokens,
                                  max_length=self.max_length)

    @torch.no_grad()
    def scores(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities, one row per text."""
        if self.kind == "causal-lm":
            raise ExportError("this model generates (a causal-lm run): it has no classes "
                              "to score")
        out = []
        for start in range(0, len(texts), batch_size):
            part = list(texts[start:start + batch_size])
            if self.verbalizer is not None:
                enc = self.verbalizer.encode(self.tokenizer, part, [0] * len(part),
                                             self.max_length).batch(range(len(part)))
            else:
                enc = self.tokenizer(part, max_length=self.max_length, truncation=True,
                                     padding="max_length", return_tensors="pt")
            logits = self.model(input_ids=enc["input_ids"],
                                attention_mask=enc["attention_mask"]).logits
            out.append(logits.float().softmax(-1))
        return torch.cat(out) if out else torch.zeros(0, len(self.label_names))

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class for each text."""
        probs = self.scores(texts)
        top = probs.argmax(-1)
        return [(self.label_names[int(i)], float(probs[row, i])) for row, i in enumerate(top)]


def load_exported(model_dir: str | Path) -> Predictor:
    """A Predictor from a directory written by `export_run` (either format)."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a fedtt export (no {MANIFEST})")
    manifest = _read_manifest(path)
    labels = manifest["label_names"]
    kind = manifest.get("kind", "classification")
    if manifest["format"] == "merged":
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        auto = AutoModelForCausalLM if kind == "causal-lm" else \
            AutoModelForSequenceClassification
        model = auto.from_pretrained(model_dir).eval()
        tok = (HashTokenizer(manifest["tokenizer"]["hash"]) if "tokenizer" in manifest
               else AutoTokenizer.from_pretrained(model_dir))
    else:
        cfg = RunConfig()
        try:
            apply(cfg, tomllib.loads(manifest["config"]))
            tensors = load_file(str(model_dir / ADAPTERS))
        except tomllib.TOMLDecodeError as exc:
            raise ExportError(f"{path}: its config is not valid TOML ({exc})") from None
        except (OSError, SafetensorError) as exc:
            raise ExportError(f"{model_dir / ADAPTERS} is not readable ({exc})") from None
        cfg.validate()
        tok = load_tokenizer(manifest["model"])
        model = _build(cfg, labels, tok)
        _load(model, tensors)
        verbalizer = backbone.verbalizer_for(cfg, tok, labels)
    return Predictor(model, tok, labels, int(manifest["max_length"]),
                     None if manifest["format"] == "merged" else verbalizer, kind,
                     int(manifest.get("max_new_tokens", 32)))


def _read_manifest(path: Path) -> dict:
    """An export's manifest, refused (`ExportError`, one line) unless it is a JSON object
    with every entry of `MANIFEST_KEYS`, a known format and at least two label names."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} is not a JSON object")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest[key], bool):
            raise ExportError(f"{path}: {key} is missing or not a {kind.__name__}")
    labels = manifest["label_names"]
    if manifest["format"] not in FORMATS:
        raise ExportError(f"{path}: format must be adapters or merged, got "
                          f"{manifest['format']!r}")
    if manifest.get("kind", "classification") not in ("classification", "causal-lm"):
        raise ExportError(f"{path}: kind must be classification or causal-lm, got "
                          f"{manifest['kind']!r}")
    fewest = 1 if manifest.get("kind") == "causal-lm" else 2  # causal-lm: its categories
    if len(labels) < fewest or not all(isinstance(x, str) for x in labels):
        raise ExportError(f"{path}: label_names must be {('one', 'two')[fewest - 1]} or more "
                          f"strings, got {labels!r}")
    return manifest
