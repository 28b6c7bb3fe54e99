"""Secure aggregation (`federation.secure_aggregation`, `federated/secagg.py`): the global
equals plain FedAvg within the quantization bound for every method, a client that drops out
after sharing its keys is survived, the server never holds a client's unmasked update, local
DP's rules hold, and what cannot work is refused by the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import faulty_app, read, tiny
from safetensors.torch import load_file

from fedtt.errors import ConfigError
from fedtt.federated import client_app as default_client
from fedtt.federated import secagg
from fedtt.federated.inprocess import InProcessGrid, run_inprocess
from fedtt.federated.strategy import FedTTStrategy

NO_MEDIAN_CLIP = {"federation.update_norm_multiple": 0.0}  # plain FedAvg's server-side clip


def run(tmp_path: Path, name: str, client_app=None, **sets) -> tuple[dict, list, list, dict]:
    cfg = tiny(tmp_path, name=name, **{**NO_MEDIAN_CLIP, **sets})
    run_inprocess(cfg, quiet=True, client_app=client_app)
    rounds, ledger, summary = read(cfg.output.dir)
    return load_file(Path(cfg.output.dir) / "global.safetensors"), rounds, ledger, summary


def with_secagg(app):
    """A test ClientApp with fedtt's secure-aggregation stages registered."""
    for action in ("secagg_keys", "secagg_shares", "secagg_unmask"):
        app.query(action)(getattr(default_client, action))
    return app


def assert_within_bound(secure: dict, plain: dict, bound: float) -> None:
    """Equal within the quantization bound plus float32 rounding of the values."""
    for name, ref in plain.items():
        slack = bound + 4 * torch.finfo(torch.float32).eps * ref.abs()
        assert bool(((secure[name] - ref).abs() <= slack).all()), name


@pytest.mark.parametrize("method", ["fedtt", "fedtt+", "lora", "ffa-lora"])
def test_secure_aggregate_equals_fedavg(tmp_path, method):
    plain, _, _, _ = run(tmp_path, "plain", **{"method.name": method, "federation.rounds": 1})
    secure, rounds, ledger, summary = run(
        tmp_path, "secure", **{"method.name": method, "federation.rounds": 1,
                               "federation.secure_aggregation": True})
    info = rounds[1]["secagg"]
    assert summary["status"] == "completed" and info["dropped"] == [] and info["threshold"] == 2
    assert_within_bound(secure, plain, info["error_bound"])
    # The ledger holds every stage, both ways; masked uploads are counted at their width.
    kinds = {(r["kind"], r["direction"]) for r in ledger if r["name"] is None}
    assert {(k, d) for k in secagg.KINDS.values() for d in ("up", "down")} <= kinds
    up = [r for r in ledger if r["direction"] == "up" and r["kind"] == "train" and r["name"]]
    assert up and all(r["dtype"] == "uint64" for r in up)
    assert rounds[1]["upload_bytes"] == sum(r["bytes"] for r in up)
    stage_bytes = sum(r["wire_bytes"] for r in ledger if r["kind"] in secagg.KINDS.values())
    assert stage_bytes == info["wire_bytes"] > 0
    assert rounds[1]["train_loss"] is not None  # the weighted loss travelled masked


def test_cross_device_secure_rounds_equal_fedavg_on_the_sampled_clients(tmp_path):
    sets = {"federation.mode": "cross-device", "federation.num_clients": 8,
            "federation.clients_per_round": 3, "data.max_train_examples": 160,
            "federation.rounds": 2}
    _, plain_rounds, _, _ = run(tmp_path, "plain", **sets)
    _, rounds, _, summary = run(tmp_path, "secure", **{
        **sets, "federation.secure_aggregation": True})
    assert summary["status"] == "completed"
    assert [r["clients"] for r in rounds] == [r["clients"] for r in plain_rounds]
    first = run(tmp_path, "plain1", **{**sets, "federation.rounds": 1})[0]
    secure1 = run(tmp_path, "secure1", **{**sets, "federation.rounds": 1,
                                          "federation.secure_aggregation": True})
    assert_within_bound(secure1[0], first, secure1[1][1]["secagg"]["error_bound"])


def test_dropout_after_sharing_keys_is_survived(tmp_path):
    """Client 1 shares its keys, then fails in training: the other two are unmasked with the
    help of their shares of its masking key, and the global is their plain FedAvg."""
    sets = {"federation.rounds": 1}
    plain, _, _, _ = run(tmp_path, "plain", client_app=faulty_app("raise"), **sets)
    secure, rounds, _, summary = run(tmp_path, "secure",
                                     client_app=with_secagg(faulty_app("raise")),
                                     **sets, **{"federation.secure_aggregation": True})
    info = rounds[1]["secagg"]
    assert summary["status"] == "completed"
    assert info["dropped"] == [None]  # it never replied, so it never named its partition
    assert sorted(rounds[1]["clients"]) == [0, 2]
    assert_within_bound(secure, plain, info["error_bound"])


def test_server_never_holds_an_unmasked_update(tmp_path, monkeypatch):
    """A spy on the server's side of the grid sees every reply; a spy in each client records
    its quantized update before masking. No reply carries it, and the method aggregates one
    thing only: the mean of the survivors."""
    unmasked: list[np.ndarray] = []
    real_quantize = secagg.quantize

    def spy_quantize(values, *args):
        q = real_quantize(values, *args)
        unmasked.append(q.copy())
        return q

    monkeypatch.setattr(secagg, "quantize", spy_quantize)
    seen: list = []
    real_deliver = InProcessGrid._deliver

    def spy_deliver(self, ids, timeout):
        replies = real_deliver(self, ids, timeout)
        seen.extend(replies)
        return replies

    monkeypatch.setattr(InProcessGrid, "_deliver", spy_deliver)
    aggregated: list[int] = []
    real_aggregate = FedTTStrategy.secure_train

    def spy_secure_train(self, server_round, grid, timeout):
        if not hasattr(self, "spied"):
            self.spied = method_aggregate = self.method.aggregate

            def aggregate(rnd, current, replies):
                aggregated.append(len(replies))
                return method_aggregate(rnd, current, replies)

            self.method.aggregate = aggregate
        return real_aggregate(self, server_round, grid, timeout)

    monkeypatch.setattr(FedTTStrategy, "secure_train", spy_secure_train)
    run(tmp_path, "secure", **{"federation.secure_aggregation": True, "federation.rounds": 2})
    assert len(unmasked) == 6 and aggregated == [1, 1]
    train_replies = [m for m in seen if "arrays" in m.content]
    assert len(train_replies) == 6
    for msg in train_replies:
        got = secagg.wire.numpy_from_array(msg.content["arrays"]["packed"]).astype(np.uint64)
        assert msg.content["arrays"]["packed"].dtype == "uint64"
        assert "num-examples" not in msg.content["metrics"]
        assert "train_loss" not in msg.content["metrics"]
        for q in unmasked:
            assert got.shape != q.shape or float((got == q).mean()) < 0.01
    # The only other replies are keys, shares and shares of secrets: bytes, no arrays.
    for msg in seen:
        if "arrays" not in msg.content and "metrics" not in msg.content:
            assert set(msg.content.keys()) <= {"keys", "shares", "unmask"}


def test_secure_aggregation_with_local_dp(tmp_path):
    """Under local DP every client weighs 1 and sends no count or loss, in the clear or
    masked; train_loss stays null and epsilon is reported as without secure aggregation."""
    _, rounds, _, summary = run(tmp_path, "dp", **{
        "federation.secure_aggregation": True, "federation.rounds": 1,
        "privacy.enabled": True, "privacy.noise_multiplier": 1.0})
    info = rounds[1]["secagg"]
    assert summary["status"] == "completed"
    assert info["weight"] == pytest.approx(3.0, abs=1e-9)
    assert rounds[1]["train_loss"] is None and rounds[1]["epsilon"] > 0


@pytest.mark.parametrize("sets, key", [
    ({"fedtt.aggregation": "exact"}, "method.name"),
    ({"fedtt.aggregation": "exact", "fedtt.client_ranks": [2, 4]}, "method.name"),
    ({"federation.num_clients": 1, "federation.min_replies": 1}, "federation.num_clients"),
    ({"federation.max_weight_share": 0.5}, "federation.max_weight_share"),
])
def test_config_refuses_what_secure_aggregation_cannot_do(tmp_path, sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny(tmp_path, **{"federation.secure_aggregation": True, **sets})


def test_quantized_sum_does_not_wrap_and_masks_cancel():
    s = secagg.Settings(bits=40)
    n = 7
    k = s.modulus_bits(n)
    rng = np.random.default_rng(1)
    values = [rng.uniform(-1, 1, 50) for _ in range(n)]
    ranges = secagg.ranges_for(48, s.clip, private=True)
    total = np.zeros(50, dtype=np.uint64)
    masks = [secagg.prg(bytes([i]) * 32, 50, k) for i in range(n)]
    for v, m in zip(values, masks, strict=True):
        total += secagg.quantize(v, ranges, s.bits, k) + m
    for m in masks:
        total -= m
    got = secagg.dequantize(total, ranges, s.bits, k)
    assert np.abs(got - np.sum(values, axis=0)).max() <= n * ranges.max() / 2 ** s.bits


def test_client_refuses_to_send_an_unmasked_update(tmp_path):
    """A client whose config asks for secure aggregation never answers a plain train message
    (a server that skipped the protocol would otherwise get its update in the clear)."""
    from flwr.app import Context, Message, RecordDict

    from fedtt.config import to_toml
    from fedtt.federated import client_app, payload
    from fedtt.federated.inprocess import act_as_server
    from fedtt.federated.runtime import CONFIG_KEY, INPROCESS_KEY, get_runtime

    cfg = tiny(tmp_path, **{"federation.secure_aggregation": True})
    run_config = {CONFIG_KEY: to_toml(cfg), INPROCESS_KEY: True}
    rt = get_runtime(run_config)
    act_as_server()
    msg = Message(RecordDict({"arrays": payload.pack([rt.initial[n] for n in rt.sent]),
                              "config": payload.train_config(1, payload.mask_of(rt.sent, rt.sent),
                                                             payload.mask_of(rt.sent, rt.sent),
                                                             True)}),
                  message_type="train", dst_node_id=2, group_id="1")
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config=run_config)
    with pytest.raises(secagg.ProtocolError, match="unmasked"):
        client_app.train(msg, ctx)


def test_plan_shows_what_secure_aggregation_costs(tmp_path):
    from fedtt.plan import format_plan, plan

    cfg = tiny(tmp_path, **{"federation.secure_aggregation": True})
    result = plan("arch:tiny-bert", ["fedtt", "lora"], run=cfg)
    for row in result["methods"].values():
        sa = row["secagg"]
        assert sa["clients"] == 3
        assert sa["upload_wire_bytes"] > 2 * row["upload_bytes"]  # uint64, plus the stages
        assert sa["download_wire_bytes"] > row["download_wire_bytes"]
        assert set(sa["stages"]) == {"keys", "shares", "unmask"}
    assert "with secure aggregation (3 clients)" in format_plan(result)
