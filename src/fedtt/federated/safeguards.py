"""What the server does about untrusted and unreliable clients, as settings and the two rules
that are plain arithmetic: the weight cap and the stop when too few replies are valid. The
checks of each reply's contents are in `validate.py`; the strategy applies both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Safeguards:
    """How the server treats untrusted and unreliable clients (see `validate.py`)."""

    min_replies: int = 1
    round_retries: int = 1
    timeout: float = 600.0
    max_update_norm: float = 0.0
    update_norm_multiple: float = 2.0
    max_abs_value: float = 1e4
    max_examples: int = 10**9
    max_eval_examples: int = 10**9
    client_examples: Mapping[int, int] | None = None  # exact rows per client, when known
    max_weight_share: float = 1.0


def capped_shares(weights: Sequence[float], cap: float) -> list[float]:
    """`weights` with no share above `cap` (at least 1/n): the largest are lowered to a
    common level t, found by bisection, so that t / sum(min(w, t)) = cap."""
    total = float(sum(weights))
    cap = max(cap, 1.0 / len(weights))
    if total <= 0 or max(weights) <= cap * total:
        return list(weights)
    low, high = 0.0, float(max(weights))
    for _ in range(60):
        mid = (low + high) / 2
        if mid <= cap * sum(min(w, mid) for w in weights):
            low = mid
        else:
            high = mid
    return [min(w, low) for w in weights]


class RoundFailed(RuntimeError):
    """Too few valid replies in a round, even after retries; the run stops."""

    def __init__(self, server_round: int, message: str) -> None:
        super().__init__(message)
        self.server_round = server_round
