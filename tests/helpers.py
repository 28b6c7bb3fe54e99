"""Helpers shared by test modules: tiny run configs, readers of a run directory, a run that
crashes mid-round and a ClientApp with a faulty client."""

import json
import time
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp

from fedtt import results
from fedtt.config import RunConfig, from_flat
from fedtt.federated import client_app as default_client
from fedtt.federated.inprocess import run_inprocess


def tiny(tmp_path: Path, name: str = "run", **sets) -> RunConfig:
    """A seconds-long run: tiny LLaMA, synthetic task, 3 clients, 3 rounds; `sets` are
    dotted config keys that override it."""
    base = {"model.name": "arch:tiny-llama", "model.max_length": 16, "data.task": "synthetic",
            "data.partition": "iid", "data.max_train_examples": 96,
            "data.max_test_examples": 64, "federation.num_clients": 3,
            "federation.rounds": 3, "training.local_steps": 6, "training.batch_size": 8,
            "training.lr": 0.01, "output.plots": False, "output.dir": str(tmp_path / name)}
    base.update(sets)
    return from_flat(base)


def read(run_dir: str | Path) -> tuple[list[dict], list[dict], dict]:
    """(rounds, ledger rows, summary) of a run directory."""
    run_dir = Path(run_dir)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return rounds, ledger, json.loads((run_dir / "summary.json").read_text())


def tiny_deployed(out_dir: Path, **sets) -> RunConfig:
    """Like `tiny`, for the Deployment Engine: 2 clients, 2 rounds, one thread each,
    results in `out_dir`."""
    base = {"model.name": "arch:tiny-llama", "model.max_length": 16, "data.task": "synthetic",
            "data.partition": "iid", "data.max_train_examples": 96,
            "data.max_test_examples": 64, "federation.num_clients": 2,
            "federation.rounds": 2, "training.local_steps": 6, "training.batch_size": 8,
            "training.lr": 0.01, "training.threads": 1, "output.plots": False,
            "output.dir": str(out_dir)}
    base.update(sets)
    return from_flat(base)


def crash_at(cfg, monkeypatch, crash_round):
    """Run `cfg` in-process until it dies while recording round `crash_round`."""
    real_round = results.Recorder.round

    def crash(self, record):
        if record.round == crash_round:
            raise KeyboardInterrupt
        real_round(self, record)

    monkeypatch.setattr(results.Recorder, "round", crash)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(cfg, quiet=True)
    monkeypatch.setattr(results.Recorder, "round", real_round)
    assert not (Path(cfg.output.dir) / "summary.json").exists()


def faulty_app(kind, victim=1, from_round=1, hang=3.0):
    app = ClientApp()

    @app.train()
    def train(message, context):
        hit = (context.node_config["partition-id"] == victim
               and message.content["config"]["server-round"] >= from_round)
        if hit and kind == "raise":
            raise RuntimeError("disk full")
        if hit and kind == "hang":
            # An abandoned call that went on to train would share torch's global generator
            # (dropout) with whatever this process runs next: it gives up instead.
            time.sleep(hang)
            raise RuntimeError("woke up after the timeout")
        return default_client.train(message, context)

    return app
