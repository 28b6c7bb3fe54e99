"""TT math: mode rule, rebuild against a slow reference, TT-SVD exactness and monotonicity."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtt import tt


@pytest.mark.parametrize("n, expected", [
    (768, (8, 8, 12)), (384, (6, 8, 8)), (576, (8, 8, 9)), (1024, (8, 8, 16)),
    (4096, (16, 16, 16)), (64, (8, 8)), (2, (2,)), (1, (1,)),
])
def test_factorize_known_sizes(n, expected):
    assert tt.factorize(n) == expected


@pytest.mark.parametrize("n", [769, 778, 11008, 5120, 13824, 997 * 2, 3 * 17 * 19])
def test_factorize_awkward_sizes_are_exact_and_bounded_where_possible(n):
    modes = tt.factorize(n)
    assert math.prod(modes) == n
    for m in modes:  # a mode above the cap must be a prime that cannot be split
        assert m <= tt.DEFAULT_MAX_MODE or all(m % p for p in range(2, int(m**0.5) + 1))


@given(st.integers(2, 20000), st.integers(2, 32))
@settings(max_examples=200, deadline=None)
def test_factorize_uses_fewest_modes_and_least_sum(n, max_mode):
    modes = tt.factorize(n, max_mode)
    assert math.prod(modes) == n
    small = [m for m in modes if m <= max_mode]
    # brute force: the fewest parts <= max_mode, and among those the least sum
    rest = math.prod(small)
    if rest > 1 and len(small) <= 4:
        divisors = [d for d in range(2, max_mode + 1) if rest % d == 0]
        for k in range(1, len(small) + 1):
            sums = [sum(c) for c in itertools.combinations_with_replacement(divisors, k)
                    if math.prod(c) == rest]
            if sums:
                assert k == len(small) and min(sums) == sum(small)
                break


def test_factorize_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 1"):
        tt.factorize(0)
    with pytest.raises(ValueError, match="max_mode"):
        tt.factorize(10, 1)


def slow_full(cores):
    """Reference contraction: every entry as an explicit sum over rank paths."""
    modes = [c.shape[1] for c in cores]
    out = torch.zeros(modes, dtype=torch.float64)
    for idx in itertools.product(*[range(m) for m in modes]):
        vec = torch.ones(1, dtype=torch.float64)
        for core, i in zip(cores, idx, strict=True):
            vec = vec @ core[:, i, :].to(torch.float64)
        out[idx] = vec.item()
    return out


modes_st = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@given(modes_st, st.integers(1, 4), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_rebuild_equals_slow_reference(modes, rank, seed):
    g = torch.Generator().manual_seed(seed)
    cores = tt.init_cores(modes, rank, 0.5, generator=g, dtype=torch.float64)
    assert torch.allclose(tt.tt_to_full(cores), slow_full(cores), atol=1e-12)


@given(modes_st.filter(lambda m: len(m) >= 2), st.integers(1, 4), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_tt_svd_recovers_exact_rank_tensor(modes, rank, seed):
    g = torch.Generator().manual_seed(seed)
    cores = tt.init_cores(modes, rank, 1.0, generator=g, dtype=torch.float64)
    full = tt.tt_to_full(cores)
    rounded = tt.tt_svd(full, modes, rank)
    assert [c.shape[1] for c in rounded] == list(modes)
    assert all(c.shape[0] <= rank and c.shape[2] <= rank for c in rounded)
    err = (tt.tt_to_full(rounded) - full).norm() / full.norm().clamp_min(1e-30)
    assert err < 1e-5


@given(st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_tt_svd_error_decreases_with_rank(seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(12, 8, 8, 6, generator=g, dtype=torch.float64)
    modes = list(dense.shape)
    errors = [float((tt.tt_to_full(tt.tt_svd(dense, modes, r)) - dense).norm())
              for r in (1, 2, 4, 8, 16, 48)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-8 * float(dense.norm())  # full rank is exact


def test_tt_svd_rounds_a_sum_of_tt_matrices():
    g = torch.Generator().manual_seed(1)
    modes = tt.matrix_modes(48, 8)
    a = tt.init_cores(modes, 2, 1.0, generator=g, dtype=torch.float64)
    b = tt.init_cores(modes, 3, 1.0, generator=g, dtype=torch.float64)
    total = tt.tt_to_full(a) + tt.tt_to_full(b)  # TT rank <= 5
    rounded = tt.tt_svd(total, modes, 5)
    assert torch.allclose(tt.tt_to_full(rounded), total, atol=1e-9)


@given(st.integers(4, 64), st.integers(4, 64), st.integers(1, 8))
@settings(max_examples=30, deadline=None)
def test_init_std_matches_target(n_in, n_out, rank):
    modes = tt.matrix_modes(n_in * 8, n_out * 8)
    target = math.sqrt(1.0 / (n_in * 8 + n_out * 8))
    stds = [float(tt.tt_to_full(tt.init_cores(modes, rank, target,
                                              generator=torch.Generator().manual_seed(s))).std())
            for s in range(20)]
    median = sorted(stds)[10]
    assert 0.5 * target < median < 2.0 * target


def test_zero_last_init_rebuilds_to_zero_and_param_count_matches_shapes():
    modes = tt.matrix_modes(768, 64)
    cores = tt.init_cores(modes, 5, 0.1, zero_last=True)
    assert torch.count_nonzero(tt.tt_to_full(cores)) == 0
    assert sum(c.numel() for c in cores) == tt.tt_param_count(modes, 5)
    assert modes == (12, 8, 8, 8, 8) and tt.tt_param_count(modes, 5) == 700


def test_ranks_are_capped_by_mode_products():
    assert tt.tt_ranks([2, 3, 4], 10) == [1, 2, 4, 1]
    with pytest.raises(ValueError):
        tt.tt_ranks([2, 2], 0)
