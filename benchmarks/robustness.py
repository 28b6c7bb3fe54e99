"""Robustness report: malformed replies through the real aggregation path, and faulty clients.

1. For every mutation in `fedtt.testing.MUTATIONS`, `--seeds` malformed replies are
   each sent with two valid replies through `FedTTStrategy.aggregate_train`. Counted: replies
   tried, rejected with a reason, rounds where the global tensors stayed bit-identical to a
   round without the bad reply, and server crashes.
2. Whole in-process runs (tiny LLaMA, 3 clients, 3 rounds) with one client that raises, one
   that hangs past the timeout, and clients too few for `min_replies`: whether each run
   completed or stopped as it should.
3. Poisoning: one of three clients replies with finite values of +-5000 every round; test
   accuracy of the clean run, the poisoned run with the default defence (each update clipped
   to 2x the round's median update norm) and with it turned off.
4. Replies out of place, through the real aggregation path: a second reply from one node, a
   round-1 reply replayed in round 2, a reply from a node not asked, two nodes claiming one
   partition, an inflated example count, out-of-range metrics: rejected, global intact.
5. Checks run as tests (their pytest outcome is recorded here): tampered and broken
   checkpoints refused before any file changes (tests/test_hardening.py), and SIGTERM/SIGINT
   on `fedtt deploy` leaving no process or key behind (tests/test_deploy_signals.py).

Writes docs/robustness.md and benchmarks/results/robustness.json.
Run: python benchmarks/robustness.py [--seeds 60]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.clientapp import ClientApp

from fedtt.config import load_config
from fedtt.federated import client_app as default_client
from fedtt.federated.inprocess import run_inprocess
from fedtt.federated.safeguards import RoundFailed, Safeguards
from fedtt.results import read_rounds
from fedtt.testing import MUTATIONS, Harness, poisoning_app

ROOT = Path(__file__).resolve().parents[1]


def fuzz(seeds: int) -> dict[str, dict]:
    base = Harness()
    base.strategy.aggregate_train(1, [base.reply(i, base.valid(i, i)) for i in (0, 1)])
    expected = base.strategy.global_state
    rows = {}
    for name, mutate in MUTATIONS.items():
        tried = rejected = intact = crashed = 0
        for seed in range(seeds):
            h = Harness()
            bad = mutate(h.valid(2, 2), random.Random(seed))
            tried += 1
            try:
                h.strategy.aggregate_train(1, [h.reply(0, h.valid(0, 0)), h.reply(2, bad),
                                               h.reply(1, h.valid(1, 1))])
            except Exception:
                crashed += 1
                continue
            rejected += len(h.strategy.stats[1].rejected) == 1
            intact += all(torch.equal(h.strategy.global_state[n], v) for n, v in expected.items())
        rows[name] = {"tried": tried, "rejected": rejected, "global_intact": intact,
                      "crashed": crashed}
        print(f"{name:<22} tried {tried}, rejected {rejected}, intact {intact}", flush=True)
    return rows


def faulty(kind: str, victim: int = 1) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message, context):
        if context.node_config["partition-id"] == victim:
            if kind == "raise":
                raise RuntimeError("simulated crash")
            time.sleep(2.0)
        return default_client.train(message, context)

    return app


def scenarios(tmp: str) -> list[dict]:
    base = {"model.name": "arch:tiny-llama", "model.max_length": 16, "data.task": "synthetic",
            "data.partition": "iid", "data.max_train_examples": 96,
            "data.max_test_examples": 64, "federation.rounds": 3, "training.local_steps": 3,
            "training.batch_size": 8, "output.plots": False}
    cases = [
        ("one of three clients raises", "raise", {}, "completed"),
        ("one of three hangs past a 1 s timeout", "hang",
         {"federation.timeout": 1.0, "federation.round_retries": 0}, "completed"),
        ("one raises, min_replies = 3 (retried twice)", "raise",
         {"federation.min_replies": 3, "federation.round_retries": 2}, "stopped"),
    ]
    out = []
    for i, (label, kind, extra, expected) in enumerate(cases):
        sets = {**base, **extra, "output.dir": f"{tmp}/s{i}"}
        cfg = load_config(None, values=sets)
        try:
            run_inprocess(cfg, quiet=True, client_app=faulty(kind))
        except RoundFailed:
            pass
        summary = json.loads((Path(cfg.output.dir) / "summary.json").read_text())
        rounds = read_rounds(cfg.output.dir)
        stopped = summary["stopped_round"] or {"failed": []}
        out.append({"scenario": label, "expected": expected, "status": summary["status"],
                    "rounds_done": summary["rounds"],
                    "failures_recorded": sum(len(r["failed"]) for r in rounds)
                    + len(stopped["failed"])})
        print(f"{label}: {summary['status']}", flush=True)
    return out


def poisoning(tmp: str) -> list[dict]:
    """Final accuracy with one client sending +-5000, with and without the default bound."""
    base = {"model.name": "arch:tiny-llama", "model.max_length": 16, "data.task": "synthetic",
            "data.partition": "iid", "data.max_train_examples": 96,
            "data.max_test_examples": 64, "federation.rounds": 4, "training.local_steps": 6,
            "training.batch_size": 8, "training.lr": 0.01, "output.plots": False}
    cases = [("clean", {}, None), ("poisoned, default defence", {}, poisoning_app()),
             ("poisoned, defence off", {"federation.update_norm_multiple": 0.0}, poisoning_app())]
    out = []
    for i, (label, extra, app) in enumerate(cases):
        sets = {**base, **extra, "output.dir": f"{tmp}/p{i}"}
        cfg = load_config(None, values=sets)
        try:
            summary = run_inprocess(cfg, quiet=True, client_app=app)
        except RoundFailed:
            summary = json.loads((Path(cfg.output.dir) / "summary.json").read_text())
        rounds = read_rounds(cfg.output.dir)
        out.append({"case": label, "status": summary["status"],
                    "final_accuracy": summary["final_accuracy"],
                    "rounds_clipped": sum(bool(r.get("clipped")) for r in rounds)})
        print(f"{label}: {summary['status']} {summary['final_accuracy']:.3f}", flush=True)
    return out


def out_of_place() -> list[dict]:
    """Replies that are well formed but not the round's: each must be refused."""
    def inflated(h: Harness) -> Message:
        content = h.valid(2, 2)
        content["metrics"]["num-examples"] = 1000
        return h.reply(2, content)

    def claims_partition_0(h: Harness) -> Message:
        content = h.valid(1, 1)
        content["metrics"]["partition-id"] = 0
        return h.reply(1, content)

    def hostile_metric(h: Harness) -> Message:
        content = h.valid(2, 2)
        content["metrics"]["train_loss"] = 1e308
        return h.reply(2, content)

    cases = {"second reply from one node": lambda h: h.reply(0, h.valid(0, 9)),
             "example count above the client's rows": inflated,
             "two nodes claim one partition": claims_partition_0,
             "train_loss 1e308": hostile_metric}
    out = []
    for label, make in cases.items():
        h = Harness()
        h.strategy.guard = Safeguards(max_examples=1000, client_examples={0: 10, 1: 11, 2: 12})
        h.strategy.aggregate_train(1, [h.reply(0, h.valid(0, 0)), make(h)])
        out.append({"case": label, "rejected": len(h.strategy.stats[1].rejected),
                    "reason": (h.strategy.stats[1].rejected or [{"reason": ""}])[0]["reason"],
                    "accepted_clients": sorted(h.strategy.stats[1].clients)})
    # a round-1 reply replayed in round 2, and a node not asked in round 2
    h = Harness()
    first = [h.reply(i, h.valid(i, i)) for i in range(3)]
    h.strategy.aggregate_train(1, first)
    h.strategy.clients_per_round = 2
    msgs = list(h.strategy.configure_train(2, ArrayRecord(), ConfigRecord(), h.strategy._grid))
    h.strategy._grid.push_messages(msgs)
    asked = sorted(m.metadata.dst_node_id for m in msgs)
    fresh = [Message(h.valid(m.metadata.dst_node_id - 2, 7), reply_to=m) for m in msgs]
    (outsider,) = {2, 3, 4} - set(asked)
    h.strategy.aggregate_train(2, [first[asked[0] - 2], first[outsider - 2], *fresh])
    for reply in h.strategy.stats[2].rejected:
        out.append({"case": "round 2: " + reply["reason"], "rejected": 1,
                    "reason": reply["reason"],
                    "accepted_clients": sorted(h.strategy.stats[2].clients)})
    for row in out:
        print(f"{row['case']}: rejected {row['rejected']}", flush=True)
    return out


def pytest_checks() -> list[dict]:
    """Run the checks that live in the test suite and record their outcome."""
    checks = [("tampered or broken checkpoints refused, files unchanged",
               ["tests/test_hardening.py", "-k", "tampered or broken"]),
              ("SIGTERM / SIGINT on fedtt deploy: no process or key left; a killed SuperNode "
               "noticed within seconds; a deploy timeout is one error",
               ["tests/test_deploy_signals.py"])]
    out = []
    for label, args in checks:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *args], cwd=ROOT, capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        out.append({"check": label, "command": shlex.join(["pytest", "-q", *args]), "outcome": last,
                    "passed": proc.returncode == 0})
        print(f"{label}: {last}", flush=True)
    return out


def write_markdown(fz: dict, sc: list[dict], seeds: int, poison: list[dict],
                   placed: list[dict], checks: list[dict]) -> str:
    total = {k: sum(r[k] for r in fz.values()) for k in ("tried", "rejected", "global_intact",
                                                         "crashed")}
    lines = [
        "# Robustness",
        "",
        "Generated by `python benchmarks/robustness.py` (do not edit by hand).",
        "",
        "## Malformed replies through the real aggregation path",
        "",
        f"Each malformed reply (`fedtt.testing`, {seeds} seeds per kind) was sent with "
        "two valid replies to `FedTTStrategy.aggregate_train`. *Rejected* means it was refused "
        "with a reason; *global intact* means the global tensors afterwards were bit-identical to "
        "a round in which that client never replied.",
        "",
        "| kind | tried | rejected | global intact | server crashed |",
        "|---|---|---|---|---|",
    ]
    for name, r in fz.items():
        lines.append(f"| {name} | {r['tried']} | {r['rejected']} | {r['global_intact']} | "
                     f"{r['crashed']} |")
    lines.append(f"| **all** | **{total['tried']}** | **{total['rejected']}** | "
                 f"**{total['global_intact']}** | **{total['crashed']}** |")
    lines += ["", "## Faulty clients in whole runs", "",
              "Tiny LLaMA, synthetic data, 3 clients, 3 rounds, in-process.", "",
              "| scenario | expected | outcome | rounds done | failures recorded |",
              "|---|---|---|---|---|"]
    for s in sc:
        lines.append(f"| {s['scenario']} | {s['expected']} | {s['status']} | "
                     f"{s['rounds_done']} | {s['failures_recorded']} |")
    runs_ok = sum(s["status"] == s["expected"] for s in sc)
    lines += ["", f"Runs that ended as expected: {runs_ok} of {len(sc)}.", "",
              "## A poisoned client", "",
              "Client 0 of 3 replies with finite values of ±5000 (inside `max_abs_value`) "
              "every round; tiny LLaMA, synthetic data, 4 rounds, 64 test rows. The default "
              "defence clips each update to `federation.update_norm_multiple` = 2 times the "
              "round's median update norm.", "",
              "| run | outcome | final accuracy | rounds with a clipped update |",
              "|---|---|---|---|"]
    for p in poison:
        lines.append(f"| {p['case']} | {p['status']} | {p['final_accuracy']:.3f} | "
                     f"{p['rounds_clipped']} |")
    lines += ["", "## Replies out of place", "",
              "Well-formed replies that are not the round's one answer from a sampled node, "
              "sent with a valid reply through `FedTTStrategy.aggregate_train` (in-process "
              "partition sizes known).", "",
              "| case | rejected | reason | clients aggregated |", "|---|---|---|---|"]
    for p in placed:
        lines.append(f"| {p['case']} | {p['rejected']} | {p['reason']} | "
                     f"{p['accepted_clients']} |")
    lines += ["", "## Checks that live in the test suite", "",
              "| check | command | outcome |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['check']} | `{c['command']}` | {c['outcome']} |")
    lines += ["", "## What a malicious client can still do", "",
              "- Send an update of up to twice the round's median norm in any direction (the "
              "bound needs an honest majority of at least three replies to hold).",
              "- On a Deployment Engine, claim up to `federation.max_weight_share` of the "
              "FedAvg weight with a made-up example count (in-process the counts are "
              "checked against the partitions; under local DP counts are not used).",
              "", "### Under secure aggregation", "",
              "With `federation.secure_aggregation` the server sees only the sum, so it "
              "cannot reject, clip or weigh-cap one reply. A malicious client can still:",
              "",
              "- Send any masked values: inside its modulus they unmask to any update, so "
              "it can shift the aggregate by up to `secagg_clip` per value (times its "
              "weight share) without the checks of the aggregate (weights in (0, "
              "survivors], mean update inside the clip range and `max_update_norm`, result "
              "within `max_abs_value`) noticing. An aggregate that fails them is refused "
              "and the round keeps the global, so one client can also stall training.",
              "- Claim any weight up to 1 (the whole training set's rows), which "
              "`max_weight_share` cannot cap (it must be 1).",
              "- Break the protocol (bad keys or shares, or drop out at the unmasking): "
              "the round survives while the threshold of clients remains, else the run "
              "stops as below `min_replies`.",
              "- It cannot learn another client's update unless t clients collude, or "
              "make the server unmask one.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60)
    args = parser.parse_args()
    fz = fuzz(args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        sc = scenarios(tmp)
        poison = poisoning(tmp)
    placed = out_of_place()
    checks = pytest_checks()
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "robustness.md").write_text(
        write_markdown(fz, sc, args.seeds, poison, placed, checks))
    results = ROOT / "benchmarks" / "results" / "robustness.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"fuzz": fz, "scenarios": sc, "seeds": args.seeds,
                                   "poisoning": poison, "out_of_place": placed,
                                   "checks": checks}, indent=2) + "\n")
    print("wrote docs/robustness.md")


if __name__ == "__main__":
    main()
