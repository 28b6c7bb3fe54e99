"""Local DP-SGD: per-sample gradients against a per-example loop (TT cores, LoRA B), clipping,
the reported epsilon against Opacus' own accountant, budgets that stop a client, seeds."""

import pytest
import torch
from flwr.app import Context, RecordDict
from helpers import read, tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

from fedtt import privacy
from fedtt.adapters import AdapterConfig
from fedtt.federated import client_app as capp
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.runtime import Runtime
from fedtt.methods import METHODS as REGISTRY
from fedtt.methods import make_method
from fedtt.methods.lora import LoRAConfig

METHODS = list(REGISTRY)  # every registered method
DP = {"privacy.enabled": True, "privacy.noise_multiplier": 0.8, "privacy.max_grad_norm": 0.5}


def small_model(arch, hidden, method, rank, bottleneck, seed):
    common = dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=2 * hidden, vocab_size=50, num_labels=3)
    cfg = (BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
           if arch == "bert" else LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    m = make_method(method, cfg=LoRAConfig(rank=rank) if "lora" in method else None,
                    adapter=AdapterConfig(rank=rank, bottleneck=bottleneck, init="gaussian"))
    return m.build(model, seed=seed).train()


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["bert", "llama"]), hidden=st.sampled_from([16, 24, 32]),
       method=st.sampled_from(["fedtt", "lora"]), rank=st.integers(1, 4),
       bottleneck=st.sampled_from([4, 6, 8]), batch=st.integers(2, 5), length=st.integers(2, 7),
       seed=st.integers(0, 1000))
def test_per_sample_grads_equal_a_per_example_loop(arch, hidden, method, rank, bottleneck,
                                                   batch, length, seed):
    model = small_model(arch, hidden, method, rank, bottleneck, seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad
             and (".core_" in n or "lora_B" in n)]
    params = [dict(model.named_parameters())[n] for n in names]
    assert params, "nothing to check"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, length), generator=gen)
    labels = torch.randint(0, 3, (batch,), generator=gen)
    mask = torch.ones_like(ids)
    grads, _ = privacy.per_sample_grads(model, {"input_ids": ids, "attention_mask": mask},
                                        labels, params)
    for i in range(batch):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        F.cross_entropy(logits.float(), labels[i:i + 1], reduction="sum").backward()
        for name, p, g in zip(names, params, grads, strict=True):
            assert torch.allclose(g[i], p.grad, atol=1e-5, rtol=1e-4), name
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in params)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 8), scale=st.floats(0.01, 100.0), max_norm=st.floats(0.1, 5.0))
def test_clip_bounds_every_per_sample_norm(batch, scale, max_norm):
    grads = [torch.randn(batch, 3, 4) * scale, torch.randn(batch, 5) * scale]
    clipped = privacy.clip(grads, max_norm)
    before = torch.stack([g.reshape(batch, -1).norm(dim=1) for g in grads]).norm(dim=0)
    after = torch.stack([g.reshape(batch, -1).norm(dim=1) for g in clipped]).norm(dim=0)
    assert bool((after <= max_norm * (1 + 1e-5)).all())
    small = before <= max_norm
    assert torch.allclose(after[small], before[small], rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), rank=st.integers(1, 3), scale=st.floats(0.1, 50.0),
       seed=st.integers(0, 2**16))
def test_masked_private_grad_touches_only_the_trained_block(batch, rank, scale, seed):
    """A lower TT rank under DP: clip the masked per-sample gradients, and noise nothing
    outside the block (what is outside is never sent, and must stay zero)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [torch.Size([3, 4, 3]), torch.Size([5])]
    grads = [torch.randn(batch, *s, generator=gen) * scale for s in shapes]
    mask = torch.zeros(shapes[0])
    mask[:, :, :rank] = 1.0
    masks = [mask, None]

    def run(noise):
        return privacy.private_grad(grads, shapes, max_norm=1.0, noise_multiplier=noise,
                                    expected_batch=4.0, generator=torch.Generator()
                                    .manual_seed(seed), masks=masks)

    noisy, exact = run(1.0), run(0.0)
    assert not bool(noisy[0][mask == 0].any()) and not bool(exact[0][mask == 0].any())
    # Clipping sees only the block: the same as clipping gradients that were zero outside.
    reference = privacy.clip([grads[0] * mask, grads[1]], 1.0)
    for got, ref in zip(exact, reference, strict=True):
        assert torch.allclose(got, ref.sum(0) / 4.0, atol=1e-6)
    assert bool(noisy[0][mask == 1].ne(exact[0][mask == 1]).all())


def opacus_epsilon(kind, noise, rate, steps, delta):
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=rate)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_is_opacus_accountants(tmp_path, accountant):
    cfg = tiny(tmp_path, **DP, **{"privacy.accountant": accountant, "federation.rounds": 3})
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    t = cfg.training
    per_client = summary["epsilon_per_client"]
    assert set(per_client) == {"0", "1", "2"}
    rate = t.batch_size / (96 / 3)  # the public nominal rows: the task's rows over the clients
    expected = opacus_epsilon(accountant, 0.8, rate, t.local_steps * 3, 1e-5)
    for eps in per_client.values():
        assert eps == pytest.approx(expected, rel=1e-6)
    worst = [r["epsilon"] for r in rounds]
    assert worst[0] is None and worst[-1] == max(per_client.values())
    assert worst[1] < worst[2] < worst[3]


def test_target_epsilon_plans_the_noise_for_a_quantile_and_a_client_over_budget_stops(
        tmp_path):
    sets = {"privacy.enabled": True, "privacy.epsilon": 3.0, "federation.mode": "cross-device",
            "federation.num_clients": 4, "federation.clients_per_round": 2,
            "federation.rounds": 6}
    cfg = tiny(tmp_path, **sets)
    rt = Runtime(cfg)
    plan = rt.privacy_plan
    # Binomial(6, 1/2): P(X <= 4) = 57/64 < 0.95 <= P(X <= 5) = 63/64
    assert plan.participations == 5
    assert plan.planned_steps == 5 * cfg.training.local_steps
    assert privacy.epsilon(plan.noise_multiplier, plan.rate, plan.planned_steps, 1e-5) <= 3.0
    assert privacy.epsilon(plan.noise_multiplier, plan.rate,
                           plan.planned_steps + cfg.training.local_steps, 1e-5) > 3.0
    # A client that has used its planned steps refuses the next round, and says why.
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    context.state[capp.STATE_PRIVACY] = capp.wire.to_record(
        {"steps": torch.tensor([plan.planned_steps])})
    with pytest.raises(privacy.BudgetSpent, match="client 0 stops training"):
        capp._privacy_check(rt, context, 0)
    # In a run the server asks only clients with budget left: none refuses, none passes it.
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    assert summary["status"] == "completed"
    assert max(summary["epsilon_per_client"].values()) <= 3.0
    assert not [f for r in rounds for f in r["failed"]]


@pytest.mark.parametrize(("rounds", "per_round", "clients", "expected"), [
    (10, 3, 3, 10), (10, 2, 20, 3), (10, 10, 100, 3), (100, 10, 100, 15), (1, 1, 50, 1)])
def test_planned_participations_is_the_95_percent_quantile(rounds, per_round, clients,
                                                            expected):
    from math import comb

    assert privacy.planned_participations(rounds, per_round, clients) == expected
    if per_round < clients:
        p = per_round / clients
        cdf = [sum(comb(rounds, j) * p**j * (1 - p)**(rounds - j) for j in range(k + 1))
               for k in range(rounds + 1)]
        assert cdf[expected] >= 0.95 and (expected == 1 or cdf[expected - 1] < 0.95)


@pytest.mark.parametrize("mode", ["cross-silo", "cross-device"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_privately_and_clipping_holds(tmp_path, monkeypatch, method, mode):
    seen = []
    real = privacy.clip

    def spy(grads, max_norm):
        out = real(grads, max_norm)
        seen.append(torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in out]).norm(dim=0))
        return out

    monkeypatch.setattr(privacy, "clip", spy)
    sets = {**DP, "method.name": method, "federation.mode": mode, "federation.rounds": 2}
    if mode == "cross-device":
        sets.update({"federation.num_clients": 6, "federation.clients_per_round": 2})
    cfg = tiny(tmp_path, **sets)
    summary = run_inprocess(cfg, quiet=True)
    assert summary["status"] == "completed" and summary["epsilon_per_client"]
    assert seen and all(bool((n <= 0.5 * (1 + 1e-5)).all()) for n in seen)


def test_same_seed_same_run_different_seed_differs(tmp_path):
    from safetensors.torch import load_file

    def run(name, seed, secure=False):
        cfg = tiny(tmp_path, name, **DP, **{"training.seed": seed, "federation.rounds": 2,
                                            "privacy.secure_mode": secure})
        run_inprocess(cfg, quiet=True)
        rounds = read(cfg.output.dir)[0]
        # The loss of private rows never leaves a client un-noised.
        assert all(r["train_loss"] is None for r in rounds)
        final = load_file(f"{cfg.output.dir}/global.safetensors")
        return [r["loss"] for r in rounds], torch.cat([t.flatten() for t in final.values()])

    (la, ta), (lb, tb), (lc, tc) = run("a", 1), run("b", 1), run("c", 2)
    assert la == lb and torch.equal(ta, tb)
    assert la != lc and not torch.equal(ta, tc)
    # secure_mode: the noise seed comes from the OS, so the same seed no longer repeats.
    (_, sa), (_, sb) = run("s1", 1, secure=True), run("s2", 1, secure=True)
    assert not torch.equal(sa, sb) and not torch.equal(sa, ta)


def test_secure_random_draws_are_uniform_and_gaussian_and_seedless():
    rng = privacy.SecureRandom()
    u = rng.rand(200_000)
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    z = rng.normal(2.0, (400, 500))
    assert z.shape == (400, 500) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 2.0) < 0.02
    assert abs(float((z.abs() < 2.0).float().mean()) - 0.6827) < 0.005  # within one std
    torch.manual_seed(0)
    a = rng.normal(1.0, (8,))
    torch.manual_seed(0)
    assert not torch.equal(a, rng.normal(1.0, (8,)))  # no seed reaches it
    # Poisson sampling on it keeps each row with the given rate.
    kept = [len(b) for b in privacy.poisson_batches(10_000, 0.05, 20, rng)]
    assert len(kept) == 20 and abs(sum(kept) / 20 - 500) < 30


def test_secure_mode_draws_sample_and_noise_from_the_os(tmp_path, monkeypatch):
    calls = {"rand": 0, "normal": 0}
    real_rand, real_normal = privacy.SecureRandom.rand, privacy.SecureRandom.normal

    def rand(self, n):
        calls["rand"] += 1
        return real_rand(self, n)

    def normal(self, std, shape):
        calls["normal"] += 1
        return real_normal(self, std, shape)

    monkeypatch.setattr(privacy.SecureRandom, "rand", rand)
    monkeypatch.setattr(privacy.SecureRandom, "normal", normal)
    cfg = tiny(tmp_path, **DP, **{"federation.rounds": 1, "privacy.secure_mode": True})
    run_inprocess(cfg, quiet=True)
    steps = cfg.federation.num_clients * cfg.training.local_steps
    assert calls["normal"] >= steps  # one noise draw per trained tensor per step
    assert calls["rand"] >= steps + 2 * calls["normal"]  # a sample per step, 2 per normal


def test_privacy_config_errors_name_the_key(tmp_path):
    from fedtt.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.epsilon"):
        tiny(tmp_path, **{"privacy.enabled": True})
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        tiny(tmp_path, **{"privacy.enabled": True, "privacy.epsilon": 1.0,
                          "privacy.noise_multiplier": 1.0})
