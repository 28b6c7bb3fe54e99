"""Checkpoints and `fedtt run --resume`: a run killed at any point continues to the same
rounds.jsonl, ledger and global tensors as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import crash_at, tiny
from safetensors.torch import load_file

from fedtt import results
from fedtt.cli import main
from fedtt.config import to_toml
from fedtt.federated.inprocess import run_inprocess

TIMING = ("seconds", "client_train_seconds", "aggregate_seconds", "eval_seconds")


def comparable(run_dir):
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in results.read_rounds(run_dir)]
    ledger = (Path(run_dir) / "ledger.jsonl").read_text().splitlines()
    return rows, ledger, load_file(str(Path(run_dir) / "global.safetensors"))


def assert_same_run(a, b):
    rows_a, ledger_a, global_a = comparable(a)
    rows_b, ledger_b, global_b = comparable(b)
    assert rows_a == rows_b
    assert ledger_a == ledger_b
    assert global_a.keys() == global_b.keys()
    assert all(torch.equal(global_a[n], global_b[n]) for n in global_a)


CASES = {
    "fedtt+ adaptive, keep-local head": {"method.name": "fedtt+", "fedtt.policy": "adaptive",
                                         "adapter.head": "keep-local"},
    "lora cross-device": {"method.name": "lora", "federation.mode": "cross-device",
                          "federation.num_clients": 8, "federation.clients_per_round": 3},
    "fedtt bfloat16, eval every 2": {"federation.precision": "bfloat16",
                                     "federation.eval_every": 2},
    "fedtt mixed client ranks": {"adapter.rank": 6, "fedtt.aggregation": "exact",
                                 "fedtt.client_ranks": [2, 4, 6]},
}


@pytest.mark.parametrize("crash_round", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch, case,
                                                           crash_round):
    sets = {**CASES[case], "federation.rounds": 5}
    full = tiny(tmp_path, "full", **sets)
    run_inprocess(full, quiet=True)

    cut = tiny(tmp_path, "cut", **sets)
    crash_at(cut, monkeypatch, crash_round)

    summary = run_inprocess(cut, quiet=True, resume=True)
    assert summary["resumed_from_round"] == crash_round - 1
    assert_same_run(full.output.dir, cut.output.dir)


def test_killed_process_resumes_from_the_cli(tmp_path):
    # One torch thread here and in the CLI processes (float sums depend on the thread count).
    sets = {"method.name": "fedtt+", "federation.rounds": 12, "training.local_steps": 8,
            "training.threads": 1}
    full = tiny(tmp_path, "full", **sets)
    run_inprocess(full, quiet=True)

    cut = tiny(tmp_path, "cut", **sets)
    config = tmp_path / "cut.toml"
    config.write_text(to_toml(cut))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedtt.cli", "run", "--quiet", "--config",
                             str(config)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rounds = Path(cut.output.dir) / "rounds.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if rounds.exists() and len(rounds.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(results.read_rounds(cut.output.dir))
    assert 4 <= killed_at < 13

    assert main(["run", "--quiet", "--resume", cut.output.dir]) == 0
    assert_same_run(full.output.dir, cut.output.dir)


@pytest.mark.parametrize("case", list(CASES))
def test_a_finished_run_continued_to_more_rounds_matches_a_longer_run(tmp_path, case):
    full = tiny(tmp_path, "full", **{**CASES[case], "federation.rounds": 4})
    run_inprocess(full, quiet=True)
    short = tiny(tmp_path, "short", **{**CASES[case], "federation.rounds": 2})
    run_inprocess(short, quiet=True)

    assert main(["run", "--quiet", "--resume", short.output.dir, "--rounds", "4"]) == 0
    assert_same_run(full.output.dir, short.output.dir)
    summary = results.read_summary(short.output.dir)
    assert summary["status"] == "completed" and summary["rounds"] == 4
    assert summary["resumed_from_round"] == 2
    # its config now says 4 rounds, so a later kill resumes to 4 with a plain --resume
    assert (Path(short.output.dir) / "config.toml").read_text() == \
        to_toml(tiny(tmp_path, "short", **{**CASES[case], "federation.rounds": 4}))


def test_continuing_to_more_rounds_refuses_what_it_cannot_extend(tmp_path, capsys):
    private = tiny(tmp_path, "dp", **{"federation.rounds": 1, "privacy.enabled": True,
                                      "privacy.noise_multiplier": 1.0})
    run_inprocess(private, quiet=True)
    done = tiny(tmp_path, "done", **{"federation.rounds": 2})
    run_inprocess(done, quiet=True)
    before = {p: p.read_bytes() for d in (private, done)
              for p in Path(d.output.dir).iterdir()}

    assert main(["run", "--resume", private.output.dir, "--rounds", "3"]) == 2
    assert "private" in capsys.readouterr().err
    for fewer in ("2", "1"):
        assert main(["run", "--resume", done.output.dir, "--rounds", fewer]) == 2
        assert "has 2 rounds" in capsys.readouterr().err
    assert main(["run", "--rounds", "3", "--out", str(tmp_path / "new")]) == 2
    assert "--set federation.rounds" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in before} == before


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    cfg = tiny(tmp_path, "done", **{"federation.rounds": 1})
    run_inprocess(cfg, quiet=True)
    assert main(["run", "--resume", cfg.output.dir]) == 2
    err = capsys.readouterr().err
    assert "finished already" in err and "--rounds N" in err
    assert main(["run", "--resume", cfg.output.dir, "--set", "federation.rounds=3"]) == 2
    assert "leave out" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a fedtt run directory" in capsys.readouterr().err
    (Path(cfg.output.dir) / "summary.json").unlink()
    (Path(cfg.output.dir) / "checkpoint.safetensors").unlink()
    assert main(["run", "--resume", cfg.output.dir]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resuming_drops_a_stopped_runs_summary(tmp_path):
    cfg = tiny(tmp_path, **{"federation.rounds": 2})
    run_inprocess(cfg, quiet=True)
    out = Path(cfg.output.dir)
    results.Recorder(out, to_toml(cfg), resume_round=1).close()
    assert not (out / "summary.json").exists()
    assert [r["round"] for r in results.read_rounds(out)] == [0, 1]


def test_checkpoint_is_safetensors_with_json_state(tmp_path):
    from safetensors import safe_open

    cfg = tiny(tmp_path, **{"method.name": "fedtt+", "fedtt.policy": "adaptive",
                            "federation.rounds": 2})
    run_inprocess(cfg, quiet=True)
    with safe_open(str(Path(cfg.output.dir) / "checkpoint.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["fedtt"])
        names = list(f.keys())
    assert meta["round"] == 2 and meta["method"]["policy"]["last_trained"]
    assert {n.split("/", 1)[1] for n in names if n.startswith("global/")} == set(meta["version"])
    assert any(n.startswith("client/") for n in names)  # cross-silo clients' stored tensors


def as_deployment_checkpoint(run_dir):
    """Rewrite an in-process checkpoint as the Deployment Engine writes it: no client state."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(run_dir) / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["fedtt"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("global/")}  # noqa: SIM118
    meta.update({"clients": {}, "engine": "deployment"})
    save_file(tensors, str(path), metadata={"fedtt": json.dumps(meta)})


@pytest.mark.parametrize("sets, why", [
    ({"privacy.enabled": True, "privacy.noise_multiplier": 1.0}, "local DP"),
    ({"adapter.head": "keep-local"}, "never leave the clients"),
])
def test_resume_without_client_state_refuses_runs_that_need_it(tmp_path, monkeypatch, capsys,
                                                                sets, why):
    cfg = tiny(tmp_path, **sets, **{"federation.rounds": 3})
    crash_at(cfg, monkeypatch, 2)
    # On fresh SuperNodes: refused before any process starts.
    assert main(["deploy", "--resume", cfg.output.dir]) == 2
    err = capsys.readouterr().err
    assert why in err
    assert ("secure_mode is off" in err) == ("privacy.enabled" in sets)
    # In-process, from a checkpoint the Deployment Engine wrote: refused before it starts.
    as_deployment_checkpoint(cfg.output.dir)
    assert main(["run", "--quiet", "--resume", cfg.output.dir]) == 2
    assert why in capsys.readouterr().err


def test_resume_from_a_deployment_checkpoint_resends_everything_once(tmp_path, monkeypatch):
    sets = {"method.name": "fedtt+", "federation.rounds": 4}
    full = tiny(tmp_path, "full", **sets)
    run_inprocess(full, quiet=True)
    cut = tiny(tmp_path, "cut", **sets)
    crash_at(cut, monkeypatch, 3)
    as_deployment_checkpoint(cut.output.dir)
    assert main(["run", "--quiet", "--resume", cut.output.dir]) == 0

    rows_full, _, global_full = comparable(full.output.dir)
    rows_cut, _, global_cut = comparable(cut.output.dir)
    metrics = ("round", "accuracy", "loss", "upload_bytes", "clients")
    assert [{k: r[k] for k in metrics} for r in rows_cut] == [
        {k: r[k] for k in metrics} for r in rows_full]
    assert all(torch.equal(global_full[n], global_cut[n]) for n in global_full)
    # FedTT+ normally sends only what changed; clients without state get every tensor once.
    full_payload = rows_full[1]["download_bytes"]
    assert rows_full[3]["download_bytes"] < full_payload
    assert rows_cut[3]["download_bytes"] == full_payload
    assert rows_cut[4]["download_bytes"] == rows_full[4]["download_bytes"]
