"""Per-client TT ranks: each client trains, uploads and receives its own rank; the server keeps
the global adapter at the full rank and aggregates in the rebuilt space."""

import pytest
import torch
from helpers import read, tiny

from fedtt import tt
from fedtt.config import ConfigError
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.runtime import Runtime
from fedtt.methods import core_groups
from fedtt.methods.fedtt import FedTTConfig

RANKS = {"adapter.rank": 6, "fedtt.aggregation": "exact", "fedtt.client_ranks": [2, 4, 6]}


def core_bytes(ledger, client, rnd, direction):
    return sum(r["bytes"] for r in ledger if r["client"] == client and r["round"] == rnd
               and r["direction"] == direction and ".core_" in (r["name"] or ""))


def test_each_client_uploads_and_downloads_at_its_own_rank(tmp_path):
    cfg = tiny(tmp_path, **RANKS, **{"federation.rounds": 3})
    summary = run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    rt = Runtime(cfg)
    groups = core_groups(rt.sent)

    def expected(rank):  # bytes of every TT layer's cores at `rank`
        return 4 * sum(tt.tt_param_count([rt.params[c].shape[1] for c in cores], rank)
                       for cores in groups.values())

    for rnd in (1, 2, 3):
        assert [core_bytes(ledger, c, rnd, "up") for c in range(3)] == [
            expected(2), expected(4), expected(6)]
    # Round 1: ranks are not known yet, so everyone gets the full rank; then their own.
    assert {core_bytes(ledger, c, 1, "down") for c in range(3)} == {expected(6)}
    assert [core_bytes(ledger, c, 2, "down") for c in range(3)] == [
        expected(2), expected(4), expected(6)]
    assert rounds[-1]["loss"] < rounds[0]["loss"]
    assert summary["status"] == "completed"


def test_server_sends_the_tt_svd_rounding_of_the_global_adapter(tmp_path):
    from fedtt.adapters import AdapterConfig
    from fedtt.federated.safeguards import Safeguards
    from fedtt.federated.strategy import FedTTStrategy
    from fedtt.methods import make_method

    cfg = tiny(tmp_path, **RANKS)
    rt = Runtime(cfg)
    method = make_method("fedtt", AdapterConfig(rank=6), FedTTConfig(aggregation="exact"))
    gen = torch.Generator().manual_seed(0)
    initial = {n: torch.randn(rt.params[n].shape, generator=gen) for n in rt.sent}
    strategy = FedTTStrategy(method, initial, stateful=True, num_clients=3, clients_per_round=3,
                             seed=0, client_eval=False, ledger=lambda rows: None,
                             guard=Safeguards())
    for cores in core_groups(rt.sent).values():
        full = tt.tt_to_full([initial[c] for c in cores])
        sent = [strategy._tensor(c, 2) for c in cores]
        assert [s.shape for s in sent] == [s.shape for s in tt.slice_cores(sent, 2)]
        assert max(s.shape[2] for s in sent) <= 2
        best = tt.tt_to_full(tt.tt_svd(full, [s.shape[1] for s in sent], 2))
        assert torch.allclose(tt.tt_to_full(sent), best, atol=1e-5)


@pytest.mark.parametrize("private", [False, True])
def test_a_low_rank_client_keeps_its_padding_zero_while_training(tmp_path, private):
    dp = {"privacy.enabled": True, "privacy.noise_multiplier": 0.8} if private else {}
    cfg = tiny(tmp_path, **RANKS, **dp)
    rt = Runtime(cfg)
    with torch.no_grad():  # a non-trivial full-rank start, as the server's first payload is
        for cores in rt.tt_groups.values():
            for c in cores:
                rt.params[c].normal_(0, 0.3)
    rt.fit_rank(2)
    masks = rt._rank_masks(2)
    rt.train_client(0, 1, rt.sent, rank=2)
    for name, mask in masks.items():
        assert not bool((rt.params[name] * (1 - mask)).any()), name
        assert bool((rt.params[name] * mask).any()), name
    sent = rt.at_rank(rt.snapshot(rt.sent), 2)
    for cores in rt.tt_groups.values():
        assert max(sent[c].shape[2] for c in cores) <= 2


def test_a_rank_above_what_small_modes_allow_counts_as_the_full_rank(tmp_path):
    # With tiny dimensions the cores cannot reach adapter.rank: a client asking for more
    # than they have holds the whole adapter, and is aggregated like one.
    cfg = tiny(tmp_path, **{**RANKS, "adapter.rank": 64, "fedtt.client_ranks": [40, 64, 3],
                            "federation.rounds": 2})
    rt = Runtime(cfg)
    top = max(rt.params[c].shape[2] for cores in rt.tt_groups.values() for c in cores)
    assert 3 < top < 40
    run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    assert all(r["rejected"] == [] and sorted(r["clients"]) == [0, 1, 2] for r in rounds[1:])
    assert core_bytes(ledger, 0, 2, "up") == core_bytes(ledger, 1, 2, "up")
    assert core_bytes(ledger, 2, 2, "up") < core_bytes(ledger, 0, 2, "up")


def test_ranks_under_dp_upload_their_own_rank_and_account_epsilon(tmp_path):
    dp = {"privacy.enabled": True, "privacy.noise_multiplier": 0.8, "federation.rounds": 2}
    cfg = tiny(tmp_path, **RANKS, **dp)
    summary = run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    ups = [core_bytes(ledger, c, 2, "up") for c in range(3)]
    assert ups[0] < ups[1] < ups[2]
    assert summary["status"] == "completed"
    assert len(summary["epsilon_per_client"]) == 3 and rounds[-1]["epsilon"] > 0


@pytest.mark.parametrize("sets, key", [
    ({"fedtt.aggregation": "factor"}, "fedtt.aggregation"),
    ({"method.name": "fedtt+", "fedtt.aggregation": "exact"}, "fedtt.aggregation"),
    ({"fedtt.client_ranks": [2, 9]}, "fedtt.client_ranks"),
])
def test_rank_config_errors_name_the_key(tmp_path, sets, key):
    with pytest.raises(ConfigError, match=key):
        tiny(tmp_path, **{**RANKS, **sets})


@pytest.mark.parametrize("node, sets, expected", [
    ({"partition-id": 1}, {}, 4),  # fedtt.client_ranks by partition id
    ({"partition-id": 4}, {}, 4),  # ... cycled
    ({"partition-id": 1, "tt-rank": 2}, {}, 2),  # a SuperNode's node config wins
    ({"partition-id": 0, "tt-rank": 6}, {}, None),  # the full rank needs no rounding
    ({"partition-id": 0, "tt-rank": 3}, {"fedtt.client_ranks": []}, 3),
    ({"partition-id": 0}, {"fedtt.client_ranks": []}, None),
])
def test_a_client_gets_the_rank_it_declares(tmp_path, node, sets, expected):
    from flwr.app import Context, RecordDict

    from fedtt.federated.client_app import client_rank

    rt = Runtime(tiny(tmp_path, **{**RANKS, **sets}))
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    assert client_rank(rt, context) == expected


@pytest.mark.parametrize("node, sets, match", [
    ({"partition-id": 0, "tt-rank": 7}, {}, "outside 1..adapter.rank"),
    ({"partition-id": 0, "tt-rank": 0}, {}, "outside 1..adapter.rank"),
])
def test_a_declared_rank_that_cannot_be_served_is_an_error(tmp_path, node, sets, match):
    from flwr.app import Context, RecordDict

    from fedtt.federated.client_app import client_rank

    rt = Runtime(tiny(tmp_path, **{**RANKS, **sets}))
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=match):
        client_rank(rt, context)
