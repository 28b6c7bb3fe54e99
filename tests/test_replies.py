"""One client cannot wreck a federation by default: poisoned updates are bounded, example
counts are checked and capped, replies are tied to the round and the sample, and every metric
is range-checked like a tensor (rounds.jsonl stays valid JSON)."""

import json
from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from helpers import read, tiny

from fedtt.federated import client_app as default_client
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.safeguards import RoundFailed, Safeguards, capped_shares
from fedtt.federated.validate import Rejected, check_evaluate_reply
from fedtt.testing import Harness, poisoning_app


def test_a_poisoned_client_is_bounded_by_default(tmp_path):
    sets = {"federation.rounds": 4, "data.max_test_examples": 64}
    clean = run_inprocess(tiny(tmp_path, "clean", **sets), quiet=True)
    cfg = tiny(tmp_path, "poisoned", **sets)
    poisoned = run_inprocess(cfg, quiet=True, client_app=poisoning_app())
    rounds, _, _ = read(cfg.output.dir)
    assert poisoned["status"] == "completed"
    assert all(r["clipped"] == [0] for r in rounds[1:])
    assert poisoned["final_accuracy"] >= clean["final_accuracy"] - 0.1
    # Without the default bound the same client wrecks the run: the poisoned average makes
    # every client's next update NaN, each is refused, and round 2 stops the run.
    off = tiny(tmp_path, "off", **sets, **{"federation.update_norm_multiple": 0.0})
    with pytest.raises(RoundFailed, match=r"round 2: 0 valid replies from 3 clients"):
        run_inprocess(off, quiet=True, client_app=poisoning_app())
    rounds, _, _ = read(off.output.dir)
    assert "clipped" not in rounds[1]  # nothing bounded: the default bound is off


@pytest.mark.parametrize(("weights", "cap", "expected"), [
    ([1.0, 1.0, 1.0], 0.5, [1.0, 1.0, 1.0]),
    ([8.0, 1.0, 1.0], 0.5, [2.0, 1.0, 1.0]),
    ([8.0, 6.0, 1.0, 1.0], 0.4, [4.0, 4.0, 1.0, 1.0]),
    ([5.0, 5.0], 0.1, [5.0, 5.0])])  # a cap below 1/n is 1/n
def test_capped_shares(weights, cap, expected):
    got = capped_shares(weights, cap)
    assert got == pytest.approx(expected, rel=1e-6)
    assert max(got) / sum(got) <= max(cap, 1 / len(weights)) + 1e-9


def test_example_counts_are_bounded_per_client_and_capped():
    server = Harness()
    server.strategy.guard = Safeguards(max_examples=1000, client_examples={0: 10, 1: 11, 2: 12})
    inflated = server.valid(2, 2)
    inflated["metrics"]["num-examples"] = 1000  # the whole training set
    server.strategy.aggregate_train(1, [server.reply(0, server.valid(0, 0)),
                                        server.reply(2, inflated)])
    (rejected,) = server.strategy.stats[1].rejected
    assert "more than client 2's 12 rows" in rejected["reason"]
    # On a deployment (no known sizes) the weight cap bounds what a claim can buy.
    weights = []
    server = Harness()
    server.strategy.guard = Safeguards(max_examples=1000, max_weight_share=0.5)
    aggregate = server.strategy.method.aggregate
    server.strategy.method.aggregate = lambda r, cur, replies: (
        weights.extend(w for _, w in replies) or aggregate(r, cur, replies))
    inflated = server.valid(2, 2)
    inflated["metrics"]["num-examples"] = 1000
    server.strategy.aggregate_train(1, [server.reply(i, c) for i, c in (
        (0, server.valid(0, 0)), (1, server.valid(1, 1)), (2, inflated))])
    assert weights[2] / sum(weights) == pytest.approx(0.5)


def test_replies_are_tied_to_the_round_and_the_sample():
    server = Harness()
    first = [server.reply(i, server.valid(i, i)) for i in range(3)]
    duplicate = server.reply(0, server.valid(0, 5))
    server.strategy.aggregate_train(1, first + [duplicate])
    reasons = [r["reason"] for r in server.strategy.stats[1].rejected]
    assert reasons == ["second reply from a node this round"]
    # Round 2: a round-1 reply replayed, and a reply from a node the round did not ask.
    from flwr.app import ArrayRecord, ConfigRecord

    strategy = server.strategy
    strategy.clients_per_round = 2
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), strategy._grid))
    strategy._grid.push_messages(messages)
    asked = sorted(m.metadata.dst_node_id for m in messages)
    (outsider,) = {2, 3, 4} - set(asked)
    node_of = {2: 0, 3: 1, 4: 2}
    stale = first[node_of[asked[0]]]  # an asked node's round-1 reply, replayed
    fresh = [Message(server.valid(node_of[m.metadata.dst_node_id], 7), reply_to=m)
             for m in messages]
    strange = Message(server.valid(node_of[outsider], 8),
                      reply_to=server.messages[node_of[outsider]])
    strategy.aggregate_train(2, [stale, strange] + fresh)
    reasons = sorted(r["reason"] for r in strategy.stats[2].rejected)
    assert reasons == ["reply from a node that was not asked this round",
                       "reply to a message this round did not send it (replayed or stale)"]
    assert sorted(strategy.stats[2].clients) == sorted(node_of[n] for n in asked)


def test_two_nodes_cannot_claim_one_partition():
    server = Harness()
    impostor = server.valid(1, 1)
    impostor["metrics"]["partition-id"] = 0
    server.strategy.aggregate_train(1, [server.reply(0, server.valid(0, 0)),
                                        server.reply(1, impostor)])
    (rejected,) = server.strategy.stats[1].rejected
    assert "partition-id 0 already belongs to node 2" in rejected["reason"]


@pytest.mark.parametrize(("key", "value"), [
    ("train_loss", 1e308), ("train_loss", -1.0), ("epsilon", -0.5), ("dp_steps", 2.5),
    ("train_seconds", float("nan")), ("surprise", 1.0)])
def test_train_metrics_are_range_checked(key, value):
    server = Harness()
    bad = server.valid(1, 1)
    bad["metrics"][key] = value
    server.strategy.aggregate_train(1, [server.reply(0, server.valid(0, 0)),
                                        server.reply(1, bad)])
    (rejected,) = server.strategy.stats[1].rejected
    assert key in rejected["reason"]


@pytest.mark.parametrize(("metrics", "needle"), [
    ({"num-examples": 1e300, "local_accuracy": 0.5}, "num-examples"),
    ({"num-examples": 10, "local_accuracy": 17.0}, "local_accuracy"),
    ({"num-examples": 10, "local_loss": float("inf")}, "local_loss"),
    ({"num-examples": 10, "local_what": 1.0}, "local_what")])
def test_evaluate_metrics_are_range_checked(metrics, needle):
    with pytest.raises(Rejected, match=needle):
        check_evaluate_reply(RecordDict({"metrics": MetricRecord(metrics)}), 100)


def test_rounds_jsonl_is_valid_json_even_for_hostile_eval_replies(tmp_path):
    app = ClientApp()
    app.train()(default_client.train)

    @app.evaluate()
    def evaluate(message, context):
        reply = default_client.evaluate(message, context)
        if context.node_config["partition-id"] == 0:
            reply.content["metrics"] = MetricRecord({"num-examples": 1e300,
                                                     "local_accuracy": 17.0})
        return reply

    cfg = tiny(tmp_path, **{"federation.rounds": 2, "federation.client_eval": True})
    run_inprocess(cfg, quiet=True, client_app=app)
    for line in (Path(cfg.output.dir) / "rounds.jsonl").read_text().splitlines():
        row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in rounds.jsonl"))
        assert row.get("local_accuracy") is None or 0 <= row["local_accuracy"] <= 1
