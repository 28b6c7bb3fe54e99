"""Integration: the real bundled MiniLM and SmolLM2 weights and the real movie-review task.

The weights come from registry packages (fetched once into the fedtt cache); nothing here
needs a model or data hub.
"""

import json

import pytest
import torch

from fedtt.adapters import AdapterConfig, TTAdapter
from fedtt.config import load_config
from fedtt.federated.inprocess import run_inprocess
from fedtt.methods import make_method
from fedtt.models import load_model, load_tokenizer

pytestmark = pytest.mark.integration
TEXTS = ["a warm, funny and moving film", "tedious, overlong and badly acted"]


@pytest.mark.parametrize("spec, adapters", [("minilm", 12), ("smollm2", 60)])
def test_real_weights_identity_then_training_step(spec, adapters):
    tok = load_tokenizer(spec)
    batch = tok(TEXTS, max_length=16, truncation=True, padding=True, return_tensors="pt")
    base = load_model(spec, 2, seed=0).eval()
    with torch.no_grad():
        expected = base(**batch).logits
    del base
    model = make_method("fedtt", AdapterConfig()).build(
        load_model(spec, 2, seed=0), seed=0)
    assert sum(isinstance(m, TTAdapter) for m in model.modules()) == adapters
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, expected)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert sum(not torch.equal(params[n], v) for n, v in trainable.items()) == len(trainable)


def test_short_federated_run_on_minilm_and_movie_reviews(tmp_path):
    sets = {"federation.rounds": 2, "training.local_steps": 2, "training.batch_size": 8,
            "data.max_train_examples": 120, "data.max_test_examples": 64,
            "output.dir": str(tmp_path / "run"), "output.plots": False}
    cfg = load_config(None, values=sets)
    assert cfg.model.name == "minilm" and cfg.data.task == "movie-reviews"
    summary = run_inprocess(cfg, quiet=True)
    assert summary["rounds"] == 2 and summary["total_upload_bytes"] > 0
    rounds = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]


def test_smollm2_cache_is_made_once_then_reused(tmp_path, monkeypatch):
    import transformers

    from fedtt import models
    from fedtt.fetch import cache_dir, fetch_package

    name, version, sha = models.SMOLLM2_PACKAGE
    wheel = fetch_package(name, version, sha256=sha)  # the shared cache (fetched once)
    monkeypatch.setenv("FEDTT_CACHE", str(tmp_path))  # a fresh cache that already has the wheel
    (cache_dir() / "packages" / wheel.parent.name).mkdir(parents=True)
    (cache_dir() / "packages" / wheel.parent.name / wheel.name).symlink_to(wheel)
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    first = models.smollm2_dir()
    weights = sorted(first.glob("*.safetensors"))
    assert calls == [models.SMOLLM2_GGUF] and weights
    stamp = [w.stat().st_mtime_ns for w in weights]
    assert models.smollm2_dir() == first and calls == [models.SMOLLM2_GGUF]  # not rebuilt
    assert [w.stat().st_mtime_ns for w in weights] == stamp
    model = load_model("smollm2", 2)  # loads from the cached float32 directory
    assert next(model.parameters()).dtype == torch.float32 and len(calls) == 1
