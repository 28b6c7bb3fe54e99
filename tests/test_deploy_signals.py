"""However `fedtt deploy` ends, nothing it started survives and no key stays on disk.

- SIGTERM (as `kill` sends it) or SIGINT (as Ctrl-C sends it: to the whole foreground process
  group) mid-run: `fedtt deploy` exits with 128 + the signal number and no traceback. Every
  process it caused to start is gone, whether its own child (SuperLink, SuperNodes, ClientApp
  workers, `flwr` CLI) or started by one of those in a session of its own (SuperExec,
  ServerApp); its temporary work dir is gone with every certificate and key.
- A run that outlives its timeout ends in one `DeploymentTimeout` with the run id and status,
  raised inside the with-block: the deployment stops all the same and restores the signal
  handlers it replaced.
- A SuperNode killed with SIGKILL is reported to the ServerApp (Flower's NODE_UNAVAILABLE
  reply) within seconds, not when its overdue heartbeats give it away (40-60 s in flwr 1.41).

Processes are found independently of `LocalDeployment`'s own bookkeeping: by walking /proc for
descendants of the process under test before the signal, and for any process whose command
line or environment mentions the deployment's work dir. A pid counts as surviving only if it
still runs with the same start time (pids get reused).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from helpers import tiny_deployed as tiny

from fedtt.config import to_toml
from fedtt.federated.deploy import (
    DeploymentTimeout,
    LocalDeployment,
    fedtt_run_config,
    write_app_dir,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc"),
    pytest.mark.skipif(not (Path(sys.executable).parent / "flower-superlink").exists(),
                       reason="flwr's deployment executables are not installed"),
]


def stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a process, None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        if (info := stat(pid)) is not None:
            children.setdefault(info[0], []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def mentioning(text: str) -> set[int]:
    """Processes whose command line or environment contains `text`."""
    found = set()
    for pid in all_pids():
        try:
            if any(text.encode() in Path(f"/proc/{pid}/{part}").read_bytes()
                   for part in ("cmdline", "environ")):
                found.add(pid)
        except OSError:
            continue
    found.discard(os.getpid())
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def survivors(started: dict[int, str]) -> list[str]:
    """Those of `started` (pid -> start time) that still run, with their command lines."""
    return [f"{pid}: {cmdline(pid)}" for pid, start in started.items()
            if (info := stat(pid)) is not None and info[1] == start and info[2] != "Z"]


def key_files(directory: Path) -> list[Path]:
    """TLS keys and certificates (*.key, *.pem) and SuperNode key pairs under `directory`."""
    return [p for p in directory.rglob("*")
            if p.suffix in (".key", ".pem") or p.parent.name == "node-keys"]


def rounds(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    except (OSError, json.JSONDecodeError):  # not there yet, or a row half written
        return []


def wait_for_rows(run_dir: Path, count: int, timeout: float,
                  proc: subprocess.Popen | None = None) -> float:
    """Wait until `run_dir` has `count` rounds recorded; the time they were seen."""
    deadline = time.monotonic() + timeout
    while len(rounds(run_dir)) < count:
        assert proc is None or proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {count} rounds in {timeout:.0f} s"
        time.sleep(0.2)
    return time.monotonic()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_mid_run_leaves_no_process_and_no_key(tmp_path, signum):
    tmp, out = tmp_path / "tmp", tmp_path / "run"
    tmp.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(to_toml(tiny(out, **{"federation.rounds": 50})), encoding="utf-8")
    log = tmp_path / "fedtt.log"
    with log.open("wb") as sink:  # TLS with SuperNode authentication: fedtt deploy's default
        proc = subprocess.Popen([sys.executable, "-m", "fedtt.cli", "deploy", "--config",
                                 str(config), "--out", str(out)],
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(tmp)})
    try:
        wait_for_rows(out, 2, timeout=300, proc=proc)  # rounds 0 and 1: mid-run
        [work] = tmp.glob("fedtt-deploy-*")
        assert {p.name for p in key_files(work)} >= {"server.key", "server.pem", "node0"}
        assert not list(work.rglob("ca.key"))  # the CA's key is never written
        pids = descendants(proc.pid) | mentioning(str(work))
        started = {pid: info[1] for pid in pids if (info := stat(pid)) is not None}
        commands = " ".join(cmdline(pid) for pid in started)
        for name in ("flower-superlink", "flower-superexec", "flwr-serverapp",
                     "flower-supernode", "clientapp-worker"):
            assert name in commands
        signalled = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C: fedtt and its `flwr log` child
        else:
            proc.send_signal(signum)
        code = proc.wait(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 128 + signum, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert signal.Signals(signum).name in text
    assert survivors(started) == []
    assert mentioning(str(work)) == set()
    assert not work.exists() and key_files(tmp) == []
    print(f"\n{signal.Signals(signum).name}: exited {code} after {seconds:.1f} s; "
          f"{len(started)} processes gone")


def test_timeout_is_one_error_and_the_deployment_still_stops(tmp_path):
    out, work = tmp_path / "run", tmp_path / "deploy"
    app = write_app_dir(tmp_path / "app",
                        fedtt_run_config(tiny(out, **{"federation.rounds": 50})))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with (pytest.raises(DeploymentTimeout) as caught,
          LocalDeployment(work, 1, tls=True, node_auth=True) as dep):
        assert signal.getsignal(signal.SIGTERM) == dep._on_signal
        assert key_files(work)
        dep.run(app, timeout=5)
    error = caught.value
    assert error.run_id > 0 and f"run {error.run_id}" in str(error)
    assert error.status and not error.status.startswith("finished")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert mentioning(str(work)) == set()
    assert key_files(work) == []


def test_killed_supernode_is_reported_within_seconds(tmp_path):
    """SIGKILL a SuperNode as the one round starts: its ClientApp worker follows it, the node
    is unregistered, and the ServerApp gets Flower's unavailable-node reply at once."""
    out = tmp_path / "run"
    app = write_app_dir(tmp_path / "app", fedtt_run_config(tiny(out, **{"federation.rounds": 1})))
    seen: dict[str, float] = {}
    with LocalDeployment(tmp_path / "deploy", 2) as dep:
        victim = next(p for p in dep.processes if p.name == "supernode1")
        node_id = int(re.search(r"SuperNode ID: (\d+)", victim.log.read_text())[1])

        def kill_as_round_1_starts() -> None:
            wait_for_rows(out, 1, timeout=240)  # round 0 is the server's own evaluation
            os.kill(victim.pid, signal.SIGKILL)
            seen["killed"] = time.monotonic()
            seen["recorded"] = wait_for_rows(out, 2, timeout=240)

        killer = threading.Thread(target=kill_as_round_1_starts, daemon=True)
        killer.start()
        result = dep.run(app, timeout=240)
        killer.join(10)
    assert result.status == "finished:completed", result.log[-3000:]
    row = rounds(out)[1]
    assert row["clients"] == [0]
    # recorded once, under its own node (not as a reply from the SuperLink, node 1)
    assert [f["node"] for f in row["failed"]] == [node_id], row["failed"]
    assert row["rejected"] == [], row["rejected"]
    # Flower's own unavailable-node reply, not the round's 600 s timeout (which would also
    # outlast the 240 s the run is given): how the strategy hears of a node that is gone
    (failure,) = row["failed"]
    assert failure["reason"] == f"client error: {NODE_UNAVAILABLE_ERROR_REASON}", failure
    print(f"\nkilled SuperNode: round 1 recorded {seen['recorded'] - seen['killed']:.1f} s later")
