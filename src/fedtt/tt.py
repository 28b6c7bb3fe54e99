"""Tensor-train (TT) math: mode factorisation, core init, dense rebuild, TT-SVD rounding.

A TT matrix here is LoRETTA's layout: the weight W (in x out) is reshaped to a d-way tensor
whose modes are the factors of `in` followed by the factors of `out`, and stored as cores
G_i of shape (r_{i-1}, k_i, r_i) with r_0 = r_d = 1. Everything is plain torch; rebuilding
is one `torch.einsum`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

DEFAULT_MAX_MODE = 16


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


@lru_cache(maxsize=256)
def factorize(n: int, max_mode: int = DEFAULT_MAX_MODE) -> tuple[int, ...]:
    """Split `n` into TT modes by a rule, not a table.

    The rule: use the fewest factors that can each be <= `max_mode`, and among those
    factorisations take the one with the smallest sum of factors (the TT parameter count
    grows with the sum of modes). 768 -> (8, 8, 12); 4096 -> (16, 16, 16).
    A prime factor larger than `max_mode` cannot be split and becomes a mode of its own
    (769 -> (769,)), which is valid but compresses nothing for that factor.
    """
    if n < 1:
        raise ValueError(f"cannot factorize {n}: a dimension must be >= 1")
    if max_mode < 2:
        raise ValueError(f"max_mode must be >= 2, got {max_mode}")
    if n == 1:
        return (1,)
    primes = _prime_factors(n)
    big = [p for p in primes if p > max_mode]
    rest = n // math.prod(big)
    if rest == 1:
        return tuple(sorted(big))
    d = 1
    while max_mode**d < rest:
        d += 1
    best: tuple[int, ...] | None = None
    for d_try in range(d, len(_prime_factors(rest)) + 1):
        best = _best_split(rest, d_try, max_mode)
        if best is not None:
            break
    assert best is not None  # splitting into all primes always fits
    return tuple(sorted(best + tuple(big)))


def _best_split(n: int, d: int, max_mode: int) -> tuple[int, ...] | None:
    """Factors (ascending) of n into exactly d parts <= max_mode with the least sum."""

    def rec(n: int, d: int, lo: int) -> tuple[int, tuple[int, ...]] | None:
        if d == 1:
            return (n, (n,)) if lo <= n <= max_mode else None
        best = None
        f = lo
        while f <= max_mode and f ** d <= n:
            if n % f == 0:
                sub = rec(n // f, d - 1, f)
                if sub is not None and (best is None or f + sub[0] < best[0]):
                    best = (f + sub[0], (f,) + sub[1])
            f += 1
        return best

    found = rec(n, d, 2)
    return None if found is None else found[1]


def matrix_modes(in_features: int, out_features: int,
                 max_mode: int = DEFAULT_MAX_MODE) -> tuple[int, ...]:
    """Modes of an in x out weight: factors of `in` (descending) then of `out` (ascending).

    Largest modes sit at the two ends, where the boundary ranks are 1, which minimises the
    parameter count: 768 x 64 -> (12, 8, 8, 8, 8).
    """
    ins = tuple(sorted(factorize(in_features, max_mode), reverse=True))
    outs = tuple(sorted(factorize(out_features, max_mode)))
    return tuple(m for m in ins + outs if m > 1) or (1,)


def tt_ranks(modes: Sequence[int], rank: int) -> list[int]:
    """Boundary-aware ranks r_0..r_d: every inner rank is `rank`, capped by what the modes
    on either side can carry (a larger rank would only add redundant parameters)."""
    if rank < 1:
        raise ValueError(f"TT rank must be >= 1, got {rank}")
    d = len(modes)
    ranks = [1]
    for i in range(1, d):
        left = math.prod(modes[:i])
        right = math.prod(modes[i:])
        ranks.append(min(rank, left, right))
    ranks.append(1)
    return ranks


def tt_param_count(modes: Sequence[int], rank: int) -> int:
    ranks = tt_ranks(modes, rank)
    return sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(modes))


def init_cores(modes: Sequence[int], rank: int, target_std: float, *,
               zero_last: bool = False, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Gaussian cores whose rebuilt tensor has entries of std about `target_std`.

    Each rebuilt entry is a sum over prod(inner ranks) paths of d Gaussian products, so the
    per-core std is (target_std^2 / prod(r_1..r_{d-1}))^(1/(2d)). With `zero_last` the last
    core is zero, so the rebuilt weight starts at exactly 0.
    """
    ranks = tt_ranks(modes, rank)
    d = len(modes)
    paths = math.prod(ranks[1:-1])
    std = (target_std**2 / paths) ** (1.0 / (2 * d))
    cores = []
    for i, k in enumerate(modes):
        shape = (ranks[i], k, ranks[i + 1])
        core = torch.randn(shape, generator=generator, dtype=dtype) * std
        if zero_last and i == d - 1:
            core.zero_()
        cores.append(core)
    return cores


def tt_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores into the full tensor (shape = modes), left to right.

    Each step is one two-operand `torch.einsum`; a single many-operand einsum gives the same
    result but pays opt_einsum's path search on every call (4-5x slower for adapter sizes).
    """
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        out = torch.einsum("ar,rkb->akb", out, core).reshape(-1, core.shape[-1])
    return out.reshape([c.shape[1] for c in cores])


def tt_to_matrix(cores: Sequence[torch.Tensor], in_features: int,
                 out_features: int) -> torch.Tensor:
    return tt_to_full(cores).reshape(in_features, out_features)


def tt_svd(tensor: torch.Tensor, modes: Sequence[int], rank: int) -> list[torch.Tensor]:
    """Round a dense tensor (any shape with numel = prod(modes)) to TT rank <= `rank`.

    Classic TT-SVD (Oseledets 2011): sweep left to right, truncating each unfolding's SVD.
    Exact when the tensor has a TT representation of that rank; otherwise quasi-optimal.
    """
    modes = list(modes)
    if tensor.numel() != math.prod(modes):
        raise ValueError(f"tensor of {tensor.numel()} entries does not fit modes {modes}")
    ranks = tt_ranks(modes, rank)
    work = tensor.detach().to(torch.float64).reshape(-1)
    cores: list[torch.Tensor] = []
    r_prev = 1
    for i, k in enumerate(modes[:-1]):
        mat = work.reshape(r_prev * k, -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(ranks[i + 1], s.numel())
        cores.append(u[:, :r].reshape(r_prev, k, r))
        work = (s[:r, None] * vh[:r]).reshape(-1)
        r_prev = r
    cores.append(work.reshape(r_prev, modes[-1], 1))
    return [c.to(tensor.dtype) for c in cores]


def pad_cores(cores: Sequence[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Zero-pad cores to the ranks `tt_ranks(modes, rank)` (TT-SVD may return fewer)."""
    modes = [c.shape[1] for c in cores]
    ranks = tt_ranks(modes, rank)
    out = []
    for i, c in enumerate(cores):
        padded = c.new_zeros(ranks[i], modes[i], ranks[i + 1])
        padded[: c.shape[0], :, : c.shape[2]] = c
        out.append(padded)
    return out


def round_cores(cores: Sequence[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """TT rounding to `rank`: TT-SVD of the rebuilt tensor (adapter tensors are small), with
    the cores padded to the full rank profile `tt_ranks(modes, rank)`."""
    modes = [c.shape[1] for c in cores]
    return pad_cores(tt_svd(tt_to_full(cores), modes, rank), rank)


def slice_cores(cores: Sequence[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """The leading rank-`rank` block of each core (the inverse of `pad_cores`)."""
    ranks = tt_ranks([c.shape[1] for c in cores], rank)
    return [c[: ranks[i], :, : ranks[i + 1]] for i, c in enumerate(cores)]
