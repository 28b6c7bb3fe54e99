"""Correct at the edges: what a DP reply reveals, DP budgets in cross-device runs, keep-local
accuracy, FedTT+ adaptive in `fedtt plan` (the wire-byte ledger and the aggregation gap are
tested in test_runtime.py)."""

import pytest
from helpers import read, tiny

from fedtt import privacy
from fedtt.federated import inprocess
from fedtt.federated.inprocess import InProcessGrid, run_inprocess
from fedtt.methods import fedtt as fedtt_method
from fedtt.plan import plan


def replies_of(monkeypatch) -> list:
    """Every reply a client sends in this test's runs."""
    seen = []
    call = InProcessGrid._call

    def spy(self, msg, timeout):
        reply = call(self, msg, timeout)
        if reply is not None:
            seen.append((msg, reply))
        return reply

    monkeypatch.setattr(InProcessGrid, "_call", spy)
    return seen


@pytest.mark.parametrize("target", [0.0, 5.0])
def test_a_dp_reply_holds_only_its_noised_tensors_and_public_values(tmp_path, monkeypatch,
                                                                    target):
    # Label skew gives the clients different row counts; nothing in a reply may show them.
    dp = {"privacy.enabled": True, "privacy.max_grad_norm": 0.5,
          "privacy.noise_multiplier": 0.0 if target else 0.8, "privacy.epsilon": target}
    cfg = tiny(tmp_path, **dp, **{"data.partition": "dirichlet", "data.alpha": 0.3,
                                  "federation.rounds": 2})
    weights = []
    aggregate = fedtt_method.FedTT.aggregate

    def spy_aggregate(self, server_round, current, replies):
        weights.extend(w for _, w in replies)
        return aggregate(self, server_round, current, replies)

    monkeypatch.setattr(fedtt_method.FedTT, "aggregate", spy_aggregate)
    seen = replies_of(monkeypatch)
    run_inprocess(cfg, quiet=True)
    rounds, _, summary = read(cfg.output.dir)
    sizes = {len(rows) for rows in inprocess_partitions(cfg)}
    assert len(sizes) > 1  # the clients' private row counts differ
    # public: the plan from the task's total rows and the config, and participation counts
    rate = cfg.training.batch_size / (96 / cfg.federation.num_clients)
    noise = privacy.noise_for(cfg.privacy, rate, 2 * cfg.training.local_steps)
    for msg, reply in seen:
        if msg.metadata.message_type != "train":
            continue
        assert list(reply.content.keys()) == ["arrays", "metrics"]
        assert list(reply.content["arrays"].keys()) == ["packed"]  # the noised tensors
        metrics = dict(reply.content["metrics"])
        steps = int(msg.content["config"]["server-round"]) * cfg.training.local_steps
        assert metrics == {
            "partition-id": msg.metadata.dst_node_id - 2,  # the node's public config
            "dp_steps": steps,
            "epsilon": pytest.approx(privacy.epsilon(noise, rate, steps, cfg.privacy.delta))}
    assert weights and set(weights) == {1.0}  # FedAvg weighs DP replies equally
    assert all(r["train_loss"] is None for r in rounds)


def inprocess_partitions(cfg):
    from fedtt.federated.runtime import get_runtime

    return get_runtime({inprocess.CONFIG_KEY: inprocess.to_toml(cfg)}).partitions


def test_cross_device_dp_with_a_target_epsilon_completes_every_round(tmp_path):
    # The settings that stopped at round 8 when noise was planned for ceil(R*K/N) rounds.
    cfg = tiny(tmp_path, **{
        "model.name": "arch:tiny-bert", "data.max_train_examples": 400,
        "data.max_test_examples": 32, "federation.mode": "cross-device",
        "federation.num_clients": 20, "federation.clients_per_round": 2,
        "federation.rounds": 10, "training.local_steps": 2, "training.batch_size": 4,
        "privacy.enabled": True, "privacy.epsilon": 3.0})
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    assert summary["status"] == "completed" and summary["rounds"] == 10
    assert all(len(r["clients"]) == 2 and not r["failed"] for r in rounds[1:])
    assert max(summary["epsilon_per_client"].values()) <= 3.0
    assert summary["clients_out_of_budget"] == rounds[-1]["clients_out_of_budget"] >= 0


def test_when_every_client_has_spent_its_budget_rounds_go_on_without_training(
        tmp_path, monkeypatch):
    monkeypatch.setattr(privacy, "planned_participations", lambda *a: 1)
    cfg = tiny(tmp_path, **{"federation.mode": "cross-device", "federation.num_clients": 4,
                            "federation.clients_per_round": 2, "federation.rounds": 4,
                            "privacy.enabled": True, "privacy.epsilon": 3.0})
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    assert summary["status"] == "completed" and summary["rounds"] == 4
    assert [len(r["clients"]) for r in rounds[1:]] == [2, 2, 0, 0]
    assert sorted(rounds[1]["clients"] + rounds[2]["clients"]) == [0, 1, 2, 3]
    assert [r["clients_out_of_budget"] for r in rounds[1:]] == [2, 4, 4, 4]
    assert summary["clients_out_of_budget"] == 4
    assert rounds[3]["accuracy"] == rounds[2]["accuracy"]  # the global model stayed


def test_keep_local_runs_are_scored_by_the_clients(tmp_path):
    cfg = tiny(tmp_path, **{"adapter.head": "keep-local", "federation.rounds": 3})
    summary = run_inprocess(cfg, quiet=True)
    rounds, _, _ = read(cfg.output.dir)
    assert summary["accuracy_source"] == "clients"
    for r in rounds[1:]:
        assert r["accuracy"] == r["local_accuracy"] and r["loss"] == r["local_loss"]
    assert summary["final_accuracy"] == rounds[-1]["local_accuracy"]
    plain = tiny(tmp_path, "plain", **{"federation.rounds": 1})
    assert run_inprocess(plain, quiet=True)["accuracy_source"] == "server"


def test_plan_predicts_fedtt_plus_adaptive_exactly_then_as_an_upper_bound(tmp_path):
    cfg = tiny(tmp_path, **{"method.name": "fedtt+", "fedtt.policy": "adaptive",
                            "federation.rounds": 6})
    run_inprocess(cfg, quiet=True)
    rounds, ledger, _ = read(cfg.output.dir)
    groups = fedtt_method.core_groups([x["name"] for x in ledger if x["name"]])
    certain = min(len(c) for c in groups.values()) - 2  # rounds before norms decide
    assert certain >= 2
    for r in range(1, 7):
        predicted = plan(cfg.model.name, ["fedtt+"], cfg.adapter, cfg, num_labels=2,
                         server_round=r)["methods"]["fedtt+"]
        actual = rounds[r]["upload_bytes"] / 3
        if r <= certain:
            assert not predicted["upper_bound"] and predicted["upload_bytes"] == actual
        else:
            assert predicted["upper_bound"] and predicted["upload_bytes"] >= actual


def test_run_prints_what_lora_would_have_sent_and_it_is_what_lora_sends(tmp_path, capsys):
    import re

    from fedtt.cli import main

    common = ["--quiet", "--set", 'model.name="arch:tiny-llama"', "--set",
              'data.task="synthetic"', "--set", 'data.partition="iid"', "--set",
              "data.max_train_examples=96", "--set", "data.max_test_examples=32", "--set",
              "federation.rounds=2", "--set", "training.local_steps=2", "--set",
              "output.plots=false"]
    assert main(["run", "--out", str(tmp_path / "tt"), *common]) == 0
    said = re.search(r"([\d.]+) MB sent on the wire \(LoRA r=8 would send ([\d.]+) MB",
                     capsys.readouterr().out)
    assert said, "the last line names both figures"
    assert main(["run", "--out", str(tmp_path / "lora"), *common, "--set",
                 'method.name="lora"']) == 0
    _, _, lora = read(tmp_path / "lora")
    assert float(said[2]) == pytest.approx(lora["total_wire_bytes"] / 1e6, abs=0.011)
