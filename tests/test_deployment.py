"""fedtt's unchanged ServerApp and ClientApp on Flower's Deployment Engine (127.0.0.1).

A SuperLink and two SuperNodes run two FedTT rounds on the tiny model; the run must match an
in-process run of the same config and seed exactly (metrics, bytes, ledger), build the model
once per process, and leave no process behind. One variant is plain HTTP and overrides a
dotted key (`federation.rounds`) with `--run-config`; the other uses TLS with SuperNode
authentication and passes the whole fedtt config as a TOML string with `--run-config`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_deployed as tiny

from fedtt.federated.deploy import (
    LocalDeployment,
    fedtt_run_config,
    read_build_log,
    traffic_report,
    write_app_dir,
)
from fedtt.federated.inprocess import run_inprocess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("flower-superlink") is None
                       and not (Path(sys.executable).parent / "flower-superlink").exists(),
                       reason="flwr's deployment executables are not installed"),
]

# Compared exactly: with `training.threads = 1` in every process the float results are
# bit-identical (with different intra-op thread counts they differ in the 7th digit).
# Node ids are random on the Deployment Engine, so clients (and ledger rows) come in node-id
# order: compared as sets. With two clients the weighted average does not depend on order.
# Wire bytes differ a little by engine (Flower's random 64-bit node ids and message metadata
# serialise to other lengths than in-process ones): compared within WIRE_TOLERANCE.
EXACT = ["round", "accuracy", "loss", "macro_f1", "train_loss", "upload_bytes",
         "download_bytes", "cumulative_bytes", "failed", "rejected", "retries",
         "aggregation_gap"]
WIRE = ["upload_wire_bytes", "download_wire_bytes"]
WIRE_TOLERANCE = 0.01


def ledger_key(row: dict) -> tuple:
    return (row["round"], row["client"], row["direction"], row["kind"], row["name"] or "")


def tensor_rows(ledger: list[dict]) -> list[dict]:
    """The ledger without its message rows' wire bytes (engine-dependent, see WIRE)."""
    return sorted(({**r, "wire_bytes": None} for r in ledger), key=ledger_key)


def assert_wire_close(mine: dict, ref: dict) -> None:
    for key in WIRE:
        assert mine[key] == pytest.approx(ref[key], rel=WIRE_TOLERANCE), key


def read_run(run_dir: Path):
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return rounds, ledger, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def flower_env(tmp_path, monkeypatch):
    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path / "flwr-home"),
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
        monkeypatch.setenv(key, value)


def inprocess_reference(cfg):
    threads = torch.get_num_threads()
    try:
        run_inprocess(cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)  # the Runtime pinned it to training.threads
    return read_run(Path(cfg.output.dir))


def group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-auth"])
def test_deployment_matches_inprocess(tmp_path, flower_env, secure):
    out = tmp_path / "deployed"
    cfg = tiny(out)
    ref_rounds, ref_ledger, ref_summary = inprocess_reference(tiny(tmp_path / "inprocess"))

    builds = tmp_path / "builds.jsonl"
    if secure:
        # The app carries a placeholder; the real config arrives as one long TOML string.
        placeholder = tiny(tmp_path / "unused", **{"federation.rounds": 1})
        app = write_app_dir(tmp_path / "app", fedtt_run_config(placeholder))
        overrides = fedtt_run_config(cfg)
    else:
        # The app says one round; a dotted key overrides it (fedtt reads `section.key`).
        app = write_app_dir(tmp_path / "app",
                            {**fedtt_run_config(cfg), "federation.rounds": 1})
        overrides = {"federation.rounds": 2}

    with LocalDeployment(tmp_path / "deploy", 2, tls=secure, node_auth=secure,
                         build_log=builds) as dep:
        pids = list(dep.pids)
        workers = {p.pid for p in dep.processes if p.name.startswith("clientapp")}
        started = time.monotonic()
        result = dep.run(app, run_config=overrides, timeout=240)
        run_seconds = time.monotonic() - started
        assert result.status == "finished:completed", result.log[-3000:]
        if secure:
            assert dep.certs is not None and len(dep.node_keys) == 2
            assert "https://" in (dep.logs / "superlink.log").read_text()

    # Nothing keeps running: every started process and everything it spawned is gone.
    assert all(group_gone(pid) for pid in pids)

    rounds, ledger, summary = read_run(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for mine, ref in zip(rounds, ref_rounds, strict=True):
        assert {k: mine.get(k) for k in EXACT} == {k: ref.get(k) for k in EXACT}
        assert_wire_close(mine, ref)
        assert sorted(mine["clients"]) == sorted(ref["clients"])
    assert tensor_rows(ledger) == tensor_rows(ref_ledger)
    assert summary["final_accuracy"] == ref_summary["final_accuracy"]
    assert summary["final_loss"] == ref_summary["final_loss"]

    # One model build per process: the ServerApp's, and one per SuperNode's ClientApp worker.
    built = read_build_log(builds)
    assert len(built) == 3 and len({b["pid"] for b in built}) == 3
    assert workers <= {b["pid"] for b in built}

    # Flower's Fleet API byte counts against the ledger's wire bytes: the same messages, plus
    # the API's own requests (pulls, heartbeats, object lists) on top.
    report = traffic_report(out, result)
    assert result.inbound_bytes + result.outbound_bytes == result.total_bytes
    assert result.inbound_bytes > report["ledger"]["upload_wire_bytes"]
    assert result.outbound_bytes > report["ledger"]["download_wire_bytes"]
    assert 1.0 < report["overhead_ratio"] < 5.0
    print(f"\n[{'tls+auth' if secure else 'insecure'}] run {run_seconds:.1f} s; "
          f"flower {result.total_bytes} B (in {result.inbound_bytes}, out "
          f"{result.outbound_bytes}) vs ledger {report['ledger']['total_wire_bytes']} B: "
          f"overhead x{report['overhead_ratio']:.2f}")


def test_secure_aggregation_on_the_deployment_engine_with_tls(tmp_path, flower_env):
    """Secure aggregation over TLS with SuperNode authentication: the four stages run as
    Flower messages between real processes, and the run equals the in-process one (the
    unmasked sum is exact integer arithmetic, whatever the random masks and node ids)."""
    sets = {"federation.secure_aggregation": True}
    ref_rounds, _, ref_summary = inprocess_reference(tiny(tmp_path / "inprocess", **sets))
    out = tmp_path / "deployed"
    placeholder = tiny(tmp_path / "unused", **{"federation.rounds": 1})
    app = write_app_dir(tmp_path / "app", fedtt_run_config(placeholder))
    with LocalDeployment(tmp_path / "deploy", 2, tls=True, node_auth=True) as dep:
        result = dep.run(app, run_config=fedtt_run_config(tiny(out, **sets)), timeout=240)
        assert result.status == "finished:completed", result.log[-3000:]
        assert "https://" in (dep.logs / "superlink.log").read_text()
    rounds, ledger, summary = read_run(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for mine, ref in zip(rounds, ref_rounds, strict=True):
        assert {k: mine.get(k) for k in EXACT} == {k: ref.get(k) for k in EXACT}
        for key in WIRE:  # the protocol's messages name node ids: 20 digits here, 1 there
            assert mine[key] == pytest.approx(ref[key], rel=0.03), key
    for r in rounds[1:]:
        assert r["secagg"]["dropped"] == [] and r["secagg"]["threshold"] == 2
    assert {"secagg-keys", "secagg-shares", "secagg-unmask"} <= {r["kind"] for r in ledger}
    assert summary["final_accuracy"] == ref_summary["final_accuracy"]


def test_repository_is_a_flower_app(tmp_path):
    """`flwr run .` from the repository packs it as a Flower app (FAB) under Flower's 10 MB."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    flwr = Path(sys.executable).parent / "flwr"
    done = subprocess.run([str(flwr), "build", "--app", str(repo)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLWR_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    fabs = list(tmp_path.glob("*.fab"))
    assert len(fabs) == 1 and fabs[0].stat().st_size < 10 * 2**20


def test_repository_app_config_leaves_a_runs_fedtt_config_alone():
    """Flower merges an app's declared keys into every run config: the repository's own must
    not override the fedtt TOML a run brings (a run given only `fedtt-config` runs it as
    written), while a value given for one of them does."""
    import tomllib

    from fedtt.config import load_config, to_toml
    from fedtt.federated.runtime import CONFIG_KEY, config_from_run_config

    repo = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    mine = load_config(None, values={
        "federation.rounds": 7, "federation.num_clients": 5, "model.name": "smollm2",
        "data.task": "bbc-news", "output.dir": "/somewhere/absolute"})
    merged = config_from_run_config({**declared, CONFIG_KEY: to_toml(mine)})
    assert to_toml(merged) == to_toml(mine)
    assert {k for k in declared if "." in k} == {
        "federation.rounds", "federation.num_clients", "model.name", "data.task", "output.dir"}
    given = config_from_run_config({**declared, CONFIG_KEY: to_toml(mine),
                                    "federation.rounds": 2, "data.task": "movie-reviews"})
    assert (given.federation.rounds, given.data.task) == (2, "movie-reviews")
    assert given.federation.num_clients == 5


def test_deploy_resumes_a_killed_run_on_fresh_supernodes(tmp_path, flower_env, monkeypatch,
                                                        capsys):
    """`fedtt deploy --resume DIR`: the ServerApp continues from the checkpoint; the new
    SuperNodes hold nothing, get every tensor in their first round, and the run ends where an
    uninterrupted one does."""
    from helpers import crash_at

    from fedtt.cli import main

    sets = {"method.name": "fedtt+", "federation.rounds": 3}
    ref_rounds, _, ref_summary = inprocess_reference(tiny(tmp_path / "inprocess", **sets))
    cut = tiny(tmp_path / "cut", **sets)
    crash_at(cut, monkeypatch, 2)

    assert main(["deploy", "--insecure", "--resume", cut.output.dir, "--timeout", "240"]) == 0
    assert "finished:completed" in capsys.readouterr().out
    rounds, _, summary = read_run(Path(cut.output.dir))
    assert summary["resumed_from_round"] == 1
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    same = [k for k in EXACT if k not in ("download_bytes", "cumulative_bytes")]
    for mine, ref in zip(rounds, ref_rounds, strict=True):
        assert {k: mine.get(k) for k in same} == {k: ref.get(k) for k in same}
        assert mine["upload_wire_bytes"] == pytest.approx(ref["upload_wire_bytes"],
                                                          rel=WIRE_TOLERANCE)
    assert rounds[2]["download_bytes"] == rounds[1]["download_bytes"]  # everything again
    assert rounds[2]["download_bytes"] > ref_rounds[2]["download_bytes"]
    assert summary["final_accuracy"] == ref_summary["final_accuracy"]
    # Flower's counts cover this run only: they are set against the rounds it made.
    traffic = summary["flower_traffic"]
    assert traffic["rounds"] == [2, 3]
    assert traffic["ledger"]["total_bytes"] == sum(
        r["upload_bytes"] + r["download_bytes"] for r in rounds[2:])
    assert traffic["ledger"]["total_wire_bytes"] == sum(
        r["upload_wire_bytes"] + r["download_wire_bytes"] for r in rounds[2:])
    assert traffic["overhead_ratio"] > 1.0
