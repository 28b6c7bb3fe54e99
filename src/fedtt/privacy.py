"""Local differential privacy: DP-SGD on each client, and each client's privacy accounting.

Each step of a client's local training is the Sampled Gaussian Mechanism, as Opacus does it:
a Poisson sample of the client's rows (each row with probability q = batch_size / n, drawn by
Opacus' `UniformWithReplacementSampler`), per-sample gradients from Opacus'
`GradSampleModule` (hooks; TT cores go through its functorch path), each clipped to
`max_grad_norm`, summed, Gaussian noise of std `noise_multiplier * max_grad_norm` added,
divided by the expected batch size q * n, then an AdamW step.

Everything a DP client publishes is a function of public values only. n is a public nominal
row count (`privacy.nominal_examples`, by default the task's training rows over the clients),
never the client's own count: q, the noise, the steps and so the epsilon are the same for
every client that took part equally often, and a reply carries no row count, loss or timing
(the server weighs DP replies equally). The client counts its own steps over every round it
takes part in; the epsilon it reports is Opacus' accountant (RDP, or PRV) over (noise, q,
steps). A target epsilon plans the noise for `planned_participations` rounds, a high quantile
of how often a cross-device client is sampled, and the server samples only clients with
rounds of budget left, so a run never stops for budget.

The sample and the noise come from a seeded torch generator (reproducible runs), or with
`privacy.secure_mode` from `SecureRandom`, the OS's cryptographic generator: a seeded one
would let anyone who knows the seed regenerate the noise and subtract it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.nn import functional as F

from fedtt.config import PrivacyConfig, RunConfig
from fedtt.devices import CPU, Compute
from fedtt.train import Encoded


class SecureRandom:
    """Uniform and Gaussian draws from `os.urandom` (the OS's CSPRNG), with no seed to know."""

    def rand(self, n: int) -> torch.Tensor:
        """`n` uniforms in [0, 1), 53 random bits each (float64)."""
        words = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else \
            torch.empty(0, dtype=torch.int64)
        return ((words >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)

    def normal(self, std: float, shape: Sequence[int]) -> torch.Tensor:
        """N(0, std^2) of `shape` (float32), by Box-Muller from two uniforms per value."""
        n = math.prod(shape)
        u1, u2 = self.rand(n), self.rand(n)
        z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
        return (std * z).float().reshape(tuple(shape))


Rng = torch.Generator | SecureRandom


def _normal(std: float, shape: Sequence[int], rng: Rng) -> torch.Tensor:
    if isinstance(rng, SecureRandom):
        return rng.normal(std, shape)
    return torch.normal(0.0, std, size=tuple(shape), generator=rng)


def poisson_batches(rows: int, rate: float, steps: int, rng: Rng) -> Iterable[list[int]]:
    """`steps` Poisson samples of range(rows), each index kept with probability `rate`:
    Opacus' sampler for a torch generator, the same rule on `SecureRandom` draws."""
    if not isinstance(rng, SecureRandom):
        return UniformWithReplacementSampler(num_samples=rows, sample_rate=rate,
                                             generator=rng, steps=steps)
    return ((rng.rand(rows) < rate).nonzero().flatten().tolist() for _ in range(steps))


class BudgetSpent(RuntimeError):
    """Another round would take a client past its target epsilon; it stops training."""


def sample_rate(batch_size: int, rows: float) -> float:
    return min(1.0, batch_size / rows)


PARTICIPATION_QUANTILE = 0.95


def planned_participations(rounds: int, per_round: int, num_clients: int) -> int:
    """Rounds of training a target epsilon is planned for: every round when every client
    takes part, else the 95% quantile of a client's participations when `per_round` of
    `num_clients` are sampled uniformly each round (Binomial(rounds, per_round/num_clients))."""
    if per_round >= num_clients:
        return rounds
    p = per_round / num_clients
    cdf = 0.0
    for k in range(rounds + 1):
        cdf += math.comb(rounds, k) * p**k * (1 - p) ** (rounds - k)
        if cdf >= PARTICIPATION_QUANTILE:
            return max(k, 1)
    return rounds


def epsilon(noise_multiplier: float, rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Opacus' epsilon after `steps` steps of the Sampled Gaussian Mechanism."""
    if steps == 0:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(noise_multiplier, rate, steps)]  # what `steps` calls of acc.step leave
    return float(acc.get_epsilon(delta))


class Plan(NamedTuple):
    """A run's DP-SGD plan, the same for every client: all of it from public values."""

    rate: float  # Poisson sample rate q
    expected_batch: float  # q * nominal rows: what the noisy sum is divided by
    noise_multiplier: float
    participations: int  # rounds a client may train within its target epsilon
    planned_steps: int  # participations * local steps


def plan(cfg: RunConfig, train_rows: int) -> Plan:
    """The DP-SGD plan of a run whose task has `train_rows` training rows in all."""
    f, t = cfg.federation, cfg.training
    nominal = cfg.privacy.nominal_examples or train_rows / f.num_clients
    rate = sample_rate(t.batch_size, nominal)
    rounds = planned_participations(f.rounds, cfg.clients_per_round(), f.num_clients)
    steps = rounds * t.local_steps
    return Plan(rate, rate * nominal, noise_for(cfg.privacy, rate, steps), rounds, steps)


def noise_for(cfg: PrivacyConfig, rate: float, planned_steps: int) -> float:
    """The noise multiplier: given, or the least one keeping the planned steps in budget."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta,
                                      sample_rate=rate, steps=max(planned_steps, 1),
                                      accountant=cfg.accountant))


def per_sample_grads(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                     params: Sequence[nn.Parameter]) -> tuple[list[torch.Tensor], float]:
    """Each example's gradient of its own loss for every tensor in `params` (B x shape), and
    the summed loss; through Opacus' GradSampleModule (its hooks are removed afterwards)."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        return _sample_grads(gsm, batch, labels, params)
    finally:
        gsm._close()


def _sample_grads(gsm: GradSampleModule, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                  params: Sequence[nn.Parameter]) -> tuple[list[torch.Tensor], float]:
    try:
        logits = gsm(**batch).logits
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss.backward()
        grads = [p.grad_sample.detach().clone() for p in params]
    finally:
        for p in params:
            p.grad_sample = None
            p.grad = None
    return grads, float(loss.detach())


def clip(grads: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale each example's gradient (all tensors together) to norm at most `max_norm`."""
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads]).norm(dim=0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * factor.view(-1, *[1] * (g.dim() - 1)) for g in grads]


def private_grad(grads: Sequence[torch.Tensor], shapes: Sequence[torch.Size], *,
                 max_norm: float, noise_multiplier: float, expected_batch: float,
                 generator: Rng,
                 masks: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Clip, sum, add N(0, (noise * max_norm)^2) and divide by the expected batch size.

    `masks` (one per tensor, None = all of it) confine everything to the entries a client
    trains, such as a lower TT rank's block: gradients are masked before clipping, so the
    clipping bound holds for what is released, and masked-out entries get no noise either.
    """
    masks = list(masks) if masks is not None else [None] * len(shapes)
    if grads and grads[0].shape[0]:
        clipped = clip([g if m is None else g * m for g, m in zip(grads, masks, strict=True)],
                       max_norm)
    else:
        clipped = None
    out = []
    for i, shape in enumerate(shapes):
        summed = clipped[i].sum(0) if clipped is not None else torch.zeros(shape)
        noise = _normal(noise_multiplier * max_norm, shape, generator)
        if masks[i] is not None:
            noise = noise * masks[i]
        out.append((summed + noise) / expected_batch)
    return out


def train_private(model: nn.Module, data: Encoded, rows: Sequence[int],
                  params: Sequence[nn.Parameter], *, steps: int, rate: float,
                  expected_batch: float, lr: float, weight_decay: float,
                  noise_multiplier: float, max_grad_norm: float, generator: Rng,
                  masks: Sequence[torch.Tensor | None] | None = None,
                  compute: Compute = CPU) -> float:
    """`steps` DP-SGD steps (AdamW on the private gradient) on `rows`, each row sampled with
    probability `rate`, the noisy sum divided by the public `expected_batch`; mean
    per-example loss of the sampled batches (it stays on the client). `masks` as in
    `private_grad` (entries outside stay as they are). `compute`: the model's device (the
    backbone must be float32 under DP: `fedtt.config` refuses a half one)."""
    params = list(params)
    if not rows:
        raise ValueError("cannot train on an empty partition")
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sampler = poisson_batches(len(rows), rate, steps, generator)
    if masks is not None:  # the private sum and its noise are formed on the CPU
        masks = [None if m is None else m.cpu() for m in masks]
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    total, seen = 0.0, 0
    try:
        for picked in sampler:
            picked_rows = rows_t[torch.as_tensor(picked, dtype=torch.long)]
            grads: list[torch.Tensor] = []
            if len(picked_rows):
                grads, loss = _sample_grads(gsm, compute.to(data.batch(picked_rows)),
                                            data.labels[picked_rows].to(compute.device),
                                            params)
                grads = [g.cpu() for g in grads]
                total, seen = total + loss, seen + len(picked_rows)
            noisy = private_grad(grads, [p.shape for p in params], max_norm=max_grad_norm,
                                 noise_multiplier=noise_multiplier,
                                 expected_batch=expected_batch, generator=generator,
                                 masks=masks)
            for p, g in zip(params, noisy, strict=True):
                p.grad = g.to(device=p.device, dtype=p.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        gsm._close()
        model.eval()
    return total / max(seen, 1)
