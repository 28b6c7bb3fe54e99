"""Issue #17, LLM scale: devices and precision (training.device, model.dtype), gradient
accumulation and checkpointing, and decoder classification through the LM head
(model.head = "verbalizer"). CUDA tests run only where torch sees a GPU."""

import pytest
import torch
from flwr.app import Context, RecordDict
from helpers import tiny
from torch.nn import functional as F

from fedtt import devices
from fedtt.config import from_flat
from fedtt.errors import ConfigError
from fedtt.export import export_run, load_exported
from fedtt.federated import client_app
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.runtime import Runtime, split_rows
from fedtt.models import load_model
from fedtt.train import evaluate, train_local
from fedtt.verbalizer import VerbalizerLM

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
METHODS = ["fedtt", "fedtt+", "lora", "ffa-lora"]


def train_rows(rt, steps, **kw):
    rows = rt.partitions[0]
    params = [rt.params[n] for n in rt.trainable]
    return train_local(rt.model, rt.train_data, rows, params, steps=steps,
                       batch_size=kw.pop("batch_size", 8), lr=kw.pop("lr", 0.01),
                       weight_decay=0.0, generator=torch.Generator().manual_seed(0),
                       compute=rt.compute, **kw)


# --- precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_backbone_trains_float32_adapters(tmp_path, method):
    rt = Runtime(tiny(tmp_path, **{"method.name": method, "model.dtype": "bfloat16"}))
    params = dict(rt.model.named_parameters())
    frozen = [p for n, p in params.items() if not p.requires_grad and not rt.method.owns(n)]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(params[n].dtype == torch.float32 for n in rt.trainable)
    assert all(p.dtype == torch.float32 for n, p in params.items() if rt.method.owns(n))
    rows = rt.partitions[0]
    before = evaluate(rt.model, rt.train_data, rows, compute=rt.compute)["loss"]
    train_rows(rt, 15)
    after = evaluate(rt.model, rt.train_data, rows, compute=rt.compute)["loss"]
    assert after < before
    assert all(params[n].dtype == torch.float32 for n in rt.trainable)
    assert all(rt.snapshot([n])[n].dtype == torch.float32 for n in rt.sent)


def test_half_backbone_runs_a_federation(tmp_path):
    cfg = tiny(tmp_path, **{"model.dtype": "bfloat16", "federation.precision": "bfloat16",
                            "federation.rounds": 2})
    summary = run_inprocess(cfg, quiet=True)
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.5


def test_float16_is_refused_where_this_torch_cannot_run_it(monkeypatch):
    monkeypatch.setattr(devices, "half_supported", lambda dtype, device: False)
    with pytest.raises(ConfigError, match="model.dtype = 'float16' is not supported on cpu"):
        devices.resolve("cpu", "float16")


def test_dp_refuses_a_half_backbone_and_accumulation():
    dp = {"privacy.enabled": True, "privacy.noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="model.dtype must be float32 under privacy"):
        from_flat({**dp, "model.dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="training.grad_accum_steps must be 1"):
        from_flat({**dp, "training.grad_accum_steps": 2})


# --- devices -------------------------------------------------------------------------------
def test_auto_picks_the_cpu_without_cuda_and_cuda_errors_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("CPU") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"training.device = '{spec}' asks for CUDA"):
            devices.resolve_device(spec)
    with pytest.raises(ConfigError, match="training.device must be auto"):
        from_flat({"training.device": "gpu"})
    with pytest.raises(ConfigError, match="training.device = 'cuda'"):
        Runtime(tiny(tmp_path, **{"training.device": "cuda"}))
    rt = Runtime(tiny(tmp_path))  # the default: auto
    assert rt.compute.device == torch.device("cpu")
    assert next(rt.model.parameters()).device == torch.device("cpu")


def test_a_supernode_uses_its_own_device(monkeypatch):
    asked = []
    monkeypatch.setattr(client_app, "get_runtime", lambda rc, device=None: asked.append(device))

    def context(node, run_config):
        return Context(run_id=1, node_id=2, node_config={"partition-id": 0, **node},
                       state=RecordDict(), run_config=run_config)

    client_app._runtime(context({}, {}))  # a SuperNode without a device: auto
    client_app._runtime(context({"device": "cpu"}, {}))
    client_app._runtime(context({}, {client_app.INPROCESS_KEY: True}))  # the server's
    assert asked == ["auto", "cpu", None]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="the node config's device = 'cuda'"):
        Runtime(from_flat({"model.name": "arch:tiny-llama", "data.task": "synthetic"}),
                device="cuda")


# --- gradient accumulation and checkpointing ------------------------------------------------
@pytest.mark.parametrize("method", ["fedtt", "lora"])
def test_accumulation_matches_one_large_batch(tmp_path, method):
    sets = {"method.name": method, "data.max_train_examples": 192}
    big, small = Runtime(tiny(tmp_path, **sets)), Runtime(tiny(tmp_path, **sets))
    loss_big = train_rows(big, 1, batch_size=12, lr=1e-3)
    loss_small = train_rows(small, 1, batch_size=4, lr=1e-3, accum_steps=3)
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    for n in big.trainable:
        g_big, g_small = big.params[n].grad, small.params[n].grad
        assert torch.allclose(g_small, g_big, rtol=1e-4, atol=1e-7), n
        assert torch.allclose(small.params[n], big.params[n], rtol=0, atol=2e-6), n
        assert not torch.equal(big.params[n], big.initial[n]) or not g_big.any(), n


@pytest.mark.parametrize("method", ["fedtt", "lora"])
def test_checkpointing_gives_the_same_loss_and_grads(tmp_path, method):
    rt = Runtime(tiny(tmp_path, **{"method.name": method}))
    batch, labels = rt.train_data.batch(range(8)), rt.train_data.labels[:8]

    def loss_and_grads():
        rt.model.train()
        rt.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(rt.model(**batch).logits.float(), labels)
        loss.backward()
        return float(loss.detach()), {n: rt.params[n].grad.clone() for n in rt.trainable}

    plain_loss, plain = loss_and_grads()
    devices.enable_gradient_checkpointing(rt.model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in rt.model.modules())
    ckpt_loss, ckpt = loss_and_grads()
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for n in rt.trainable:
        assert torch.allclose(ckpt[n], plain[n], rtol=1e-5, atol=1e-8), n


# --- the verbalizer head -------------------------------------------------------------------
def hand_scores(lm, prompts, label_ids):
    """Each label's log-probability after each prompt, one full forward per pair."""
    out = torch.zeros(len(prompts), len(label_ids))
    for i, prompt in enumerate(prompts):
        for c, word in enumerate(label_ids):
            ids = torch.tensor([prompt + word])
            logp = lm(input_ids=ids).logits[0].float().log_softmax(-1)
            out[i, c] = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(word))
    return out


@pytest.mark.parametrize("words", [[[7], [9], [11]], [[7, 8], [9], [11, 12, 13]]])
def test_verbalizer_scores_are_log_probabilities_of_the_words(words):
    lm = load_model("arch:tiny-llama", 2, seed=3, causal=True).eval()
    model = VerbalizerLM(lm, words)
    prompts = [[1, 5, 6, 20, 21], [1, 40], [1, 2, 3, 4, 5, 6, 7, 8]]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = hand_scores(lm, prompts, words)
    assert got.shape == (3, 3)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("method", ["fedtt", "lora"])
def test_verbalizer_head_with_adapters_scores_by_hand(tmp_path, method):
    rt = Runtime(tiny(tmp_path, **{"method.name": method, "model.head": "verbalizer",
                                   "model.verbalizers": ["really bad", "good"],
                                   "adapter.init": "gaussian"}))
    assert not any("score" in n or "classifier" in n for n in rt.trainable)
    assert [len(i) for i in rt.verbalizer.label_ids] == [2, 1]
    enc = rt.test_data
    rows = list(range(4))
    prompts = [enc.input_ids[i, :int(enc.attention_mask[i].sum())].tolist() for i in rows]
    with torch.no_grad():
        got = rt.model(**enc.batch(rows)).logits
        want = hand_scores(rt.model.lm, prompts, rt.verbalizer.label_ids)
    assert torch.allclose(got, want, atol=1e-5)
    before = evaluate(rt.model, rt.train_data, rt.partitions[0])["loss"]
    train_rows(rt, 10)
    assert evaluate(rt.model, rt.train_data, rt.partitions[0])["loss"] < before


def test_verbalizer_prompts_keep_the_template_end(tmp_path):
    rt = Runtime(tiny(tmp_path, **{"model.head": "verbalizer", "model.max_length": 6,
                                   "model.template": "review: {text} verdict:"}))
    tok, v = rt.tokenizer, rt.verbalizer
    end = tok._ids("verdict:")[1:]
    for i in range(len(rt.train_data)):
        n = int(rt.train_data.attention_mask[i].sum())
        row = rt.train_data.input_ids[i, :n].tolist()
        assert n <= 6 - 1 and row[0] == 1 and row[-len(end):] == end
    assert v.words == ["negative", "positive"]


def test_verbalizer_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.head = 'verbalizer' needs a decoder"):
        Runtime(tiny(tmp_path, **{"model.name": "arch:tiny-bert", "model.head": "verbalizer"}))
    with pytest.raises(ConfigError, match="model.verbalizers has 3 words but the task has 2"):
        Runtime(tiny(tmp_path, **{"model.head": "verbalizer",
                                  "model.verbalizers": ["a", "b", "c"]}))
    with pytest.raises(ConfigError, match="model.verbalizers: 'good' and 'Good' are the same"):
        Runtime(tiny(tmp_path, **{"model.head": "verbalizer",
                                  "model.verbalizers": ["good", "Good"]}))
    with pytest.raises(ConfigError, match="model.template must hold"):
        from_flat({"model.head": "verbalizer", "model.template": "no slot"})


def test_verbalizer_run_exports_and_predicts_what_it_evaluated(tmp_path):
    cfg = tiny(tmp_path, **{"model.head": "verbalizer", "federation.rounds": 2})
    summary = run_inprocess(cfg, quiet=True)
    test = split_rows(cfg)[2]
    predictor = load_exported(export_run(cfg.output.dir, tmp_path / "export"))
    probs = predictor.scores(list(test["text"]))
    accuracy = float((probs.argmax(-1) == torch.tensor(list(test["label"]))).float().mean())
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-6)


# --- CUDA ------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_bfloat16_run(tmp_path, method):
    cfg = tiny(tmp_path, **{"method.name": method, "training.device": "cuda",
                            "model.dtype": "bfloat16", "federation.rounds": 2})
    summary = run_inprocess(cfg, quiet=True)
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.5


@cuda
def test_cuda_model_and_masters(tmp_path):
    rt = Runtime(tiny(tmp_path, **{"training.device": "cuda", "model.dtype": "float16",
                                   "model.head": "verbalizer",
                                   "training.gradient_checkpointing": True,
                                   "training.grad_accum_steps": 2}))
    assert all(p.device.type == "cuda" for p in rt.model.parameters())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in rt.initial.values())
    before = evaluate(rt.model, rt.train_data, rt.partitions[0], compute=rt.compute)["loss"]
    train_rows(rt, 15, accum_steps=2)
    after = evaluate(rt.model, rt.train_data, rt.partitions[0], compute=rt.compute)["loss"]
    assert after < before


@cuda
def test_cuda_dp_float32(tmp_path):
    cfg = tiny(tmp_path, **{"training.device": "cuda", "privacy.enabled": True,
                            "privacy.noise_multiplier": 0.5, "federation.rounds": 2})
    assert run_inprocess(cfg, quiet=True)["status"] == "completed"
