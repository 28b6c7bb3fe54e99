"""The `[fedtt]` config section: FedTT's and FedTT+'s own settings.

The TT adapter itself (rank, modes, placement, head, norms) is configured in `[adapter]`
(`fedtt.adapters.AdapterConfig`), which both TT methods build from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("fixed", "round-robin", "adaptive")


@dataclass
class FedTTConfig:
    """FedTT and FedTT+: aggregation, FedTT+'s freezing policy, per-client TT ranks."""

    aggregation: str = field(default="factor", metadata={
        "help": "'factor' averages each TT core; 'exact' averages the rebuilt matrices and "
                "rounds back to rank r by TT-SVD (fedtt only).", "choices": ("factor", "exact")})
    policy: str = field(default="round-robin", metadata={
        "help": "fedtt+: which intermediate core trains with the first and last each round: "
                "fixed, round-robin or adaptive.", "choices": POLICIES})
    client_ranks: list[int] = field(default_factory=list, metadata={
        "help": "fedtt: each client's TT rank by partition id (cycled), e.g. [2, 5, 8]; a "
                "SuperNode's node config 'tt-rank' overrides. The global adapter keeps "
                "adapter.rank, aggregates exactly and each client gets its TT-SVD rounding. "
                "Empty = every client at adapter.rank.", "min": 1})
