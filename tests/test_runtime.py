"""The federated runtime end to end on tiny models: every method, cross-silo and cross-device,
the output schema, the byte ledger against `fedtt plan`, FedTT+'s frozen cores, determinism."""

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from helpers import read, tiny
from safetensors.torch import load_file

from fedtt.adapters import AdapterConfig
from fedtt.federated import client_app as capp
from fedtt.federated import wire
from fedtt.federated.inprocess import InProcessGrid, run_inprocess
from fedtt.federated.runtime import get_runtime
from fedtt.methods import METHODS as REGISTRY
from fedtt.methods import core_groups
from fedtt.methods.fedtt import FedTTConfig
from fedtt.plan import plan

METHODS = list(REGISTRY)  # every registered method
ROUND_KEYS = {"round", "method", "accuracy", "loss", "upload_bytes", "download_bytes",
              "cumulative_bytes", "clients", "seconds", "epsilon"}
LEDGER_KEYS = {"round", "client", "direction", "name", "shape", "dtype", "bytes", "sent"}
TIMING = {"seconds", "client_train_seconds", "aggregate_seconds", "eval_seconds"}


@pytest.mark.parametrize("mode", ["cross-silo", "cross-device"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_and_writes_the_schema(tmp_path, method, mode):
    sets = {"method.name": method, "federation.mode": mode, "federation.rounds": 4}
    if mode == "cross-device":
        sets.update({"federation.num_clients": 12, "federation.clients_per_round": 4,
                     "data.max_train_examples": 240})
    cfg = tiny(tmp_path, **sets)
    summary = run_inprocess(cfg, quiet=True)
    rounds, ledger, saved = read(cfg.output.dir)
    assert [r["round"] for r in rounds] == list(range(5))
    for r in rounds:
        assert ROUND_KEYS <= set(r) and r["epsilon"] is None and r["method"] == method
    assert rounds[-1]["loss"] < rounds[0]["loss"]  # the global model improved
    assert saved["final_accuracy"] == summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert saved["machine"]["arch"] == platform.machine() and saved["machine"]["cpu"]
    assert saved["machine"]["cores"] == os.cpu_count()  # which machine's floats these are
    assert all(LEDGER_KEYS <= set(row) for row in ledger)
    expected_clients = 3 if mode == "cross-silo" else 4
    assert all(len(r["clients"]) == expected_clients for r in rounds[1:])
    assert (Path(cfg.output.dir) / "config.toml").exists()
    assert json.loads((Path(cfg.output.dir) / "label_counts.json").read_text())["counts"]


def flower_bytes(msg) -> int:
    """Flower's own objects of a message, deflated as it sends them."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def spy_on_messages(monkeypatch) -> dict[str, int]:
    """Count the bytes of every message the in-process grid delivers, and every reply."""
    seen = {"down": 0, "up": 0}
    call = InProcessGrid._call

    def spy(self, msg, timeout):
        seen["down"] += flower_bytes(msg)
        reply = call(self, msg, timeout)
        if reply is not None:
            seen["up"] += flower_bytes(reply)
        return reply

    monkeypatch.setattr(InProcessGrid, "_call", spy)
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_ledger_matches_sent_tensors_wire_and_plan(tmp_path, method, monkeypatch):
    cfg = tiny(tmp_path, **{"method.name": method})
    seen = spy_on_messages(monkeypatch)
    run_inprocess(cfg, quiet=True)
    rounds, ledger, summary = read(cfg.output.dir)
    predicted = plan(cfg.model.name, [method], cfg.adapter, cfg, num_labels=2)
    per_client = predicted["methods"][method]
    for r in rounds[1:]:
        up = [x for x in ledger if x["round"] == r["round"] and x["direction"] == "up"]
        down = [x for x in ledger if x["round"] == r["round"] and x["direction"] == "down"]
        assert sum(x["bytes"] for x in up) == r["upload_bytes"]
        assert sum(x["bytes"] for x in down) == r["download_bytes"]
        assert sum(x["wire_bytes"] for x in up) == r["upload_wire_bytes"]
        assert sum(x["wire_bytes"] for x in down) == r["download_wire_bytes"]
        for x in up + down:
            if x["name"] is None:  # a message row: its wire bytes, no tensor of its own
                assert x["bytes"] == 0 and x["wire_bytes"] > 0
                continue
            numel = int(torch.Size(x["shape"]).numel())
            assert x["bytes"] == (numel * 4 if x["sent"] else 0) and x["wire_bytes"] == 0
        # each client: one train message each way
        assert len([x for x in up + down if x["name"] is None]) == 3 * 2
        # packed: a message is its payload plus a small fixed frame, however many tensors
        train_up = [x["wire_bytes"] for x in up if x["name"] is None and x["kind"] == "train"]
        assert max(train_up) < r["upload_bytes"] / 3 + 1500
    # The ledger's wire bytes are exactly Flower's count of the messages that were sent.
    assert seen["up"] == summary["total_upload_wire_bytes"]
    assert seen["down"] == summary["total_download_wire_bytes"]
    round2 = rounds[2]
    assert round2["upload_bytes"] == 3 * per_client["upload_bytes"]
    assert round2["download_bytes"] == 3 * per_client["download_bytes"]
    train_rows = [x for x in ledger if x["round"] == 2 and x["name"] is None
                  and x["kind"] == "train"]
    for direction in ("up", "down"):
        actual = [x["wire_bytes"] for x in train_rows if x["direction"] == direction]
        expected = per_client[f"{'upload' if direction == 'up' else 'download'}_wire_bytes"]
        assert all(abs(a - expected) <= 16 for a in actual), (direction, actual, expected)


def test_ffa_lora_sends_half_of_lora_adapter_bytes(tmp_path):
    sizes = {}
    for method in ("lora", "ffa-lora"):
        cfg = tiny(tmp_path, method, **{"method.name": method, "federation.rounds": 1})
        run_inprocess(cfg, quiet=True)
        _, ledger, _ = read(cfg.output.dir)
        sizes[method] = sum(x["bytes"] for x in ledger
                            if x["direction"] == "up" and "lora_" in (x["name"] or ""))
    assert sizes["ffa-lora"] * 2 == sizes["lora"] > 0


def test_fedtt_plus_frozen_cores_never_travel_and_stay_identical(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, **{"method.name": "fedtt+", "federation.rounds": 4})
    seen = []  # (round, trained names, client's full travelling state after training)
    original = capp.Runtime.train_client

    def spy(self, partition_id, server_round, names, rank=None):
        out = original(self, partition_id, server_round, names, rank)
        seen.append((server_round, set(names), self.snapshot(self.sent)))
        return out

    monkeypatch.setattr(capp.Runtime, "train_client", spy)
    run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    rt = get_runtime({"fedtt-config": (Path(cfg.output.dir) / "config.toml").read_text(),
                      "fedtt-progress": False})
    groups = core_groups(rt.sent)
    all_cores = {c for cores in groups.values() for c in cores}
    assert any(len(cores) > 3 for cores in groups.values())
    for server_round in range(1, 5):
        states = [(names, s) for r, names, s in seen if r == server_round]
        assert len(states) == 3
        trained = states[0][0]
        frozen = all_cores - trained
        assert frozen, "FedTT+ froze nothing"
        for name in frozen:  # identical on every client, bit for bit
            assert all(torch.equal(states[0][1][name], s[name]) for _, s in states[1:])
        sent_up = {x["name"] for x in ledger
                   if x["round"] == server_round and x["direction"] == "up" and x["sent"]}
        assert not (sent_up & frozen), "a frozen core was uploaded"
    final = load_file(str(Path(cfg.output.dir) / "global.safetensors"))
    last_trained, last_states = seen[-1][1], seen[-1][2]
    for name in all_cores - last_trained:
        assert torch.equal(last_states[name], final[name])


def test_same_seed_same_metrics_different_seed_differs(tmp_path):
    def metrics(name, seed):
        cfg = tiny(tmp_path, name, **{"method.name": "fedtt", "training.seed": seed})
        run_inprocess(cfg, quiet=True)
        rounds, _, _ = read(cfg.output.dir)
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rounds]

    a, b, c = metrics("a", 0), metrics("b", 0), metrics("c", 1)
    assert a == b
    assert a != c


def test_exact_aggregation_logs_a_smaller_gap_than_factor():
    """The gap is the applied aggregate's error relative to the update, on the same replies:
    exact aggregation (TT-SVD of the average, within rank) is closer than factor averaging."""
    from fedtt import tt
    from fedtt.methods import make_method

    g = torch.Generator().manual_seed(1)
    modes = tt.matrix_modes(24, 8)
    current = {f"l.core_{i}": c for i, c in enumerate(tt.init_cores(modes, 4, 1.0, generator=g))}
    replies = [({n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in current.items()}, w)
               for w in (10.0, 20.0, 30.0)]
    target = sum(tt.tt_to_full([s[n] for n in current]).double() * w for s, w in replies) / 60
    update = float((target - tt.tt_to_full(list(current.values())).double()).norm())
    gaps = {}
    for agg in ("factor", "exact"):
        m = make_method("fedtt", AdapterConfig(), FedTTConfig(aggregation=agg))
        new, metrics = m.aggregate(1, current, replies)
        error = float((tt.tt_to_full([new[n] for n in current]).double() - target).norm())
        assert metrics["aggregation_gap"] == pytest.approx(error / update, rel=1e-6)
        gaps[agg] = metrics["aggregation_gap"]
    assert 0 <= gaps["exact"] < gaps["factor"]


def test_exact_aggregation_is_closer_to_the_matrix_average():
    from fedtt import tt
    from fedtt.methods import make_method

    g = torch.Generator().manual_seed(0)
    modes = tt.matrix_modes(24, 8)
    clients = [{f"l.core_{i}": c for i, c in enumerate(tt.init_cores(modes, 3, 1.0, generator=g))}
               for _ in range(3)]
    replies = [(c, w) for c, w in zip(clients, (10.0, 20.0, 30.0), strict=True)]
    current = clients[0]
    target = sum(tt.tt_to_full(list(c.values())).double() * w for c, w in replies) / 60.0
    errors = {}
    for agg in ("factor", "exact"):
        m = make_method("fedtt", AdapterConfig(), FedTTConfig(aggregation=agg))
        new, metrics = m.aggregate(1, current, replies)
        rebuilt = tt.tt_to_full([new[f"l.core_{i}"] for i in range(len(modes))]).double()
        errors[agg] = float((rebuilt - target).norm() / target.norm())
        assert metrics["aggregation_gap"] > 0
    assert errors["exact"] < errors["factor"]


def test_cross_device_thousand_clients_runs(tmp_path):
    cfg = tiny(tmp_path, **{"federation.mode": "cross-device", "federation.num_clients": 1000,
                            "federation.clients_per_round": 10, "federation.rounds": 2,
                            "data.max_train_examples": 2000, "training.local_steps": 2})
    run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    assert [len(r["clients"]) for r in rounds[1:]] == [10, 10]
    assert len({c for r in rounds for c in r["clients"]}) == 20 or rounds[1]["clients"] != \
        rounds[2]["clients"]


def test_cross_device_fedtt_plus_resyncs_stateless_clients(tmp_path):
    cfg = tiny(tmp_path, **{"method.name": "fedtt+", "federation.mode": "cross-device",
                            "federation.num_clients": 12, "federation.clients_per_round": 4,
                            "data.max_train_examples": 240})
    run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    for r in rounds[1:]:
        down = [x for x in ledger if x["round"] == r["round"] and x["direction"] == "down"]
        assert all(x["sent"] for x in down)  # frozen cores included: the client kept nothing
        assert r["download_bytes"] > r["upload_bytes"]


def test_client_eval_reports_local_metrics(tmp_path):
    cfg = tiny(tmp_path, **{"federation.client_eval": True, "federation.rounds": 2})
    run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    assert all(0.0 <= r["local_accuracy"] <= 1.0 for r in rounds[1:])


def test_eval_every_skips_metrics_between_but_counts_every_round(tmp_path):
    cfg = tiny(tmp_path, **{"federation.eval_every": 2, "federation.rounds": 5,
                            "output.plots": True})
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    evaluated = [r["round"] for r in rounds if r["accuracy"] is not None]
    assert evaluated == [0, 2, 4, 5]  # every 2nd, and always the last
    assert all(r["loss"] is None and r["upload_bytes"] > 0 for r in rounds if r["round"] in (1, 3))
    assert summary["final_accuracy"] == rounds[-1]["accuracy"] and summary["rounds"] == 5
    assert summary["total_bytes"] == sum(r["upload_bytes"] + r["download_bytes"] for r in rounds)
    assert (Path(cfg.output.dir) / "plots" / "accuracy_vs_mb.png").exists()


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_payloads_halve_the_ledger_and_keep_float32_masters(tmp_path, precision):
    runs = {}
    for p in ("float32", precision):
        cfg = tiny(tmp_path, p, **{"federation.precision": p, "method.name": "fedtt+"})
        run_inprocess(cfg, quiet=True)
        runs[p] = read(cfg.output.dir)
    (full, _, s32), (half, ledger16, s16) = runs["float32"], runs[precision]
    assert all(row["dtype"] == precision for row in ledger16)
    for a, b in zip(full[1:], half[1:], strict=True):
        assert 2 * b["upload_bytes"] == a["upload_bytes"] > 0
        assert 2 * b["download_bytes"] == a["download_bytes"] > 0
    assert s16["total_bytes"] * 2 == s32["total_bytes"]
    assert half[-1]["loss"] < half[0]["loss"]  # still learns
    assert abs(half[-1]["loss"] - full[-1]["loss"]) < 0.05 * full[-1]["loss"]
    saved = load_file(str(tmp_path / precision / "global.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert any(not torch.equal(t, t.to(wire.PRECISIONS[precision]).float())
               for t in saved.values())  # averaging in float32 leaves the half grid


def test_report_table_and_shared_plots(tmp_path, capsys):
    from fedtt.cli import main

    dirs = []
    for method in ("fedtt", "lora"):
        cfg = tiny(tmp_path, method, **{"method.name": method, "federation.rounds": 2})
        run_inprocess(cfg, quiet=True)
        dirs.append(cfg.output.dir)
    assert main(["report", *dirs, "--plots", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "fedtt" in out and "lora" in out
    assert (tmp_path / "cmp" / "accuracy_vs_mb.png").stat().st_size > 1000


def test_split_seed_keeps_the_rows_while_training_seed_changes_the_rest(tmp_path):
    """data.split_seed fixes the test and validation rows across training seeds; the
    partition still follows training.seed; unset, the split follows training.seed."""
    from fedtt.federated.runtime import Runtime

    def rows(seed: int, split: int) -> Runtime:
        return Runtime(tiny(tmp_path, f"s{seed}-{split}", **{
            "training.seed": seed, "data.split_seed": split, "data.val_fraction": 0.2}))

    def same(a, b) -> bool:
        return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)

    fixed0, fixed1 = rows(0, 7), rows(1, 7)
    assert same(fixed0.test_data, fixed1.test_data) and same(fixed0.val_data, fixed1.val_data)
    assert same(fixed0.train_data, fixed1.train_data)
    assert fixed0.partitions != fixed1.partitions
    own0, own1 = rows(0, -1), rows(1, -1)
    assert not same(own0.test_data, own1.test_data)
    assert same(own0.test_data, rows(0, 0).test_data)
    assert not same(own0.test_data, fixed0.test_data)
