"""Run fedtt's unchanged ServerApp and ClientApp on Flower's Deployment Engine, on this machine.

`LocalDeployment` starts a SuperLink and N SuperNodes on free 127.0.0.1 ports (optionally with
TLS and SuperNode authentication), submits a Flower app directory (see `appdir.py`) with
`flwr run`, waits for the run, and reads Flower's traffic figures with `flwr ls --format json`.
Whichever way it ends (normally, on an exception, on SIGTERM or SIGINT) it stops every process
it caused to start, Flower's own children included, and deletes its private keys; see
`LocalDeployment.stop`. Each SuperNode gets a long-lived ClientApp worker (`worker.py`) unless
`warm=False`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtt.config import toml_value
from fedtt.federated.deploy.appdir import BUILD_LOG_ENV
from fedtt.federated.deploy.certificates import (
    Certificates,
    NodeKeys,
    make_node_keys,
    make_self_signed_certs,
)
from fedtt.federated.deploy.processes import (
    MARKER,
    Process,
    die_with_parent,
    executable,
    free_port,
    logged_node_id,
    marked_pids,
    signal_process,
    tail,
    wait_port,
)

CONNECTION = "fedtt-local"  # connection name in $FLWR_HOME/config.toml
WORKER_MODULE = "fedtt.federated.deploy.worker"  # run with `python -m` beside each SuperNode

DEFAULT_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else uv builds a per-run env
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One finished `flwr run`: its id, final status and Flower's own figures for it."""

    run_id: int
    status: str  # e.g. "finished:completed"
    inbound_bytes: int  # SuperNodes -> SuperLink (Fleet API payloads)
    outbound_bytes: int  # SuperLink -> SuperNodes
    total_bytes: int
    seconds: float  # wall time of submit + wait, seen from here
    listing: dict[str, Any] = field(default_factory=dict)  # the run's `flwr ls` JSON entry
    log: str = ""  # the ServerApp log, as `flwr log` streamed it


class DeploymentTimeout(RuntimeError):
    """A Flower run that had not finished when its timeout ran out; it was stopped."""

    def __init__(self, run_id: int, status: str, timeout: float) -> None:
        super().__init__(f"run {run_id} was still {status or 'not listed'} after "
                         f"{timeout:.0f} s (the timeout); it was stopped")
        self.run_id = run_id
        self.status = status


class Interrupted(SystemExit):
    """SIGTERM or SIGINT arrived while a `LocalDeployment` was up. Raised from the signal
    handler, so the with-block unwinds and the deployment is stopped and its keys deleted;
    uncaught, it exits with the conventional status 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class LocalDeployment:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1; used as a context manager.

    `warm=True` (default) starts each SuperNode with `--isolation process` plus one
    ClientApp worker (`worker.py`), so the model is built once per SuperNode;
    `warm=False` keeps Flower's default `--isolation subprocess` (a fresh process, and model,
    per message). `tls=True` serves every API (SuperLink and the SuperNodes' Runtime APIs)
    over TLS with certificates made here; `node_auth=True` (needs TLS) also turns on
    SuperNode authentication and registers each node's public key with `flwr supernode
    register` before the node starts.

    Inside the with-block (entered in the main thread) SIGTERM and SIGINT raise `Interrupted`,
    so the block unwinds; on leaving it, however that happens, `stop` ends every process the
    deployment caused to start and deletes its private keys, then the previous signal
    handlers return. While it is up, a SuperNode or ClientApp worker that dies takes its
    partner down and is unregistered from the SuperLink, so the ServerApp hears of it within
    seconds (see `_watch_nodes`).

    `build_log` (instrumentation): a file to which every process of the deployment that builds
    the model appends one JSON line (it sets `FEDTT_BUILD_LOG`; see `read_build_log`).
    """

    def __init__(self, workdir: str | Path, num_nodes: int = 2, *, tls: bool = False,
                 node_auth: bool = False, warm: bool = True,
                 node_configs: Sequence[Mapping[str, Any]] | None = None,
                 env: Mapping[str, str] | None = None, startup_timeout: float = 60.0,
                 preload: Sequence[str] = ("fedtt.federated.client_app",),
                 build_log: str | Path | None = None) -> None:
        if node_auth and not tls:
            raise ValueError("SuperNode authentication requires TLS")
        self.workdir = Path(workdir).absolute()
        self.num_nodes = num_nodes
        self.tls, self.node_auth, self.warm = tls, node_auth, warm
        self.node_configs = list(node_configs or [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)])
        if len(self.node_configs) != num_nodes:
            raise ValueError("need one node config per node")
        self.startup_timeout = startup_timeout
        self.preload_args = [a for m in preload for a in ("--preload", m)]
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, **DEFAULT_ENV, "FLWR_HOME": str(self.home), **(env or {}),
                    MARKER: self.marker}
        if build_log is not None:
            self.env[BUILD_LOG_ENV] = str(Path(build_log).absolute())
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.processes: list[Process] = []
        self.node_processes: list[list[Process]] = []  # per node: its SuperNode [and worker]
        self.certs: Certificates | None = None
        self.node_keys: list[NodeKeys] = []
        self.superlink_port = 0
        self.node_ports: list[int] = []
        self._previous_handlers: dict[int, Any] = {}
        self._stopping = False
        self._held_signal = 0  # a signal that arrived while stopping, re-raised afterwards
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            if threading.current_thread() is threading.main_thread():  # else: the caller's
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            self.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self.stop()
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            self._previous_handlers.clear()
        held, self._held_signal = self._held_signal, 0
        if held and exc_type is None:
            raise Interrupted(held)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stopping:  # let the cleanup finish; `__exit__` raises it afterwards
            self._held_signal = self._held_signal or signum
            return
        _log.warning("fedtt: %s: stopping the local deployment", signal.Signals(signum).name)
        raise Interrupted(signum)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def start(self) -> None:
        """Start the SuperLink, write the CLI connection, then start every SuperNode."""
        self._stopping = False
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_self_signed_certs(self.workdir / "certs")
        self.superlink_port = free_port()
        cmd = [executable("flower-superlink"), "--host", "127.0.0.1",
               "--port", str(self.superlink_port), "--disable-runtime-dependency-installation",
               *self._server_tls_args()]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        link = self._spawn("superlink", cmd)
        wait_port("127.0.0.1", self.superlink_port, link.proc, self.startup_timeout,
                   "flower-superlink", link.log)
        self._write_connection()
        if self.node_auth:
            for i in range(self.num_nodes):
                keys = make_node_keys(self.workdir / "node-keys", f"node{i}")
                self.node_keys.append(keys)
                self.flwr("supernode", "register", str(keys.public_key), CONNECTION,
                          "--name", f"node{i}")
        for i, node_config in enumerate(self.node_configs):
            self._start_node(i, node_config)
        self.wait_for_nodes(self.num_nodes)
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch_nodes, name="fedtt-node-watch",
                                         daemon=True)
        self._watcher.start()

    def _start_node(self, i: int, node_config: Mapping[str, Any]) -> None:
        port = free_port()
        self.node_ports.append(port)
        cmd = [executable("flower-supernode"), "--superlink", self.address,
               "--host", "127.0.0.1", "--port", str(port),
               "--node-config", " ".join(f"{k}={toml_value(v)}"
                                          for k, v in node_config.items()),
               "--isolation", "process" if self.warm else "subprocess"]
        if self.tls:
            assert self.certs is not None
            cmd += ["--root-certificates", str(self.certs.ca_cert),
                    *self._server_tls_args()]  # the node's Runtime API over TLS too
        else:
            cmd.append("--insecure")
        if self.node_auth:
            cmd += ["--auth-supernode-private-key", str(self.node_keys[i].private_key)]
        node = self._spawn(f"supernode{i}", cmd)
        self.node_processes.append([node])
        wait_port("127.0.0.1", port, node.proc, self.startup_timeout, f"supernode {i}",
                   node.log)
        if self.warm:
            worker = [sys.executable, "-m", WORKER_MODULE, "clientapp-worker",
                      "--runtime-api-address", f"127.0.0.1:{port}",
                      "--parent-pid", str(node.pid), *self.preload_args]
            if self.tls:
                assert self.certs is not None
                worker += ["--root-certificates", str(self.certs.ca_cert)]
            else:
                worker.append("--insecure")
            self.node_processes[-1].append(self._spawn(f"clientapp{i}", worker))

    def _server_tls_args(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        assert self.certs is not None
        return ["--ssl-certfile", str(self.certs.server_cert),
                "--ssl-keyfile", str(self.certs.server_key),
                "--ssl-ca-certfile", str(self.certs.ca_cert)]

    def _write_connection(self) -> None:
        """`[superlink.fedtt-local]` in $FLWR_HOME/config.toml, the CLI's connection."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "",
                 f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        if self.tls:
            assert self.certs is not None
            lines.append(f"root-certificates = {toml_value(str(self.certs.ca_cert))}")
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _spawn(self, name: str, cmd: list[str]) -> Process:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=self.workdir,
                                    start_new_session=True, preexec_fn=die_with_parent)
        process = Process(name, proc, log)
        self.processes.append(process)
        return process

    def stop(self, grace: float = 3.0) -> None:
        """End every process of this deployment, then delete its certificates and node keys.

        Every process started here carries `FEDTT_DEPLOYMENT=<this deployment's marker>` in
        its environment, and so does everything those start in turn: the SuperExec that the
        SuperLink starts in a session of its own, the ServerApp that the SuperExec starts
        (which may ignore SIGTERM), ClientApp processes, `flwr` CLI calls. Each one found
        (Linux: in /proc; elsewhere only the processes started here) gets SIGTERM, sent to
        its whole process group when it leads one, and SIGKILL once `grace` seconds have
        passed, until none is left.
        """
        self._stopping = True
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(grace)  # it may be in a `flwr` call: ended below if still so
        deadline = time.monotonic() + grace
        asked: set[int] = set()
        while (pids := self._live_pids()) and time.monotonic() < deadline + grace:
            if time.monotonic() < deadline:
                for pid in pids - asked:
                    signal_process(pid, signal.SIGTERM)
                asked |= pids
            else:
                for pid in pids:
                    signal_process(pid, signal.SIGKILL)
            time.sleep(0.1)
        if pids:
            _log.warning("fedtt: processes %s survived SIGKILL", sorted(pids))
        for directory in ("certs", "node-keys"):
            shutil.rmtree(self.workdir / directory, ignore_errors=True)
        self.processes.clear()
        self.node_processes.clear()

    def _live_pids(self) -> set[int]:
        """This deployment's processes that are still running (reaping those started here)."""
        started = {p.pid for p in self.processes if p.proc.poll() is None}
        return started | marked_pids(f"{MARKER}={self.marker}")

    def _watch_nodes(self, interval: float = 0.5) -> None:
        """Until `stop`: when a node's SuperNode or ClientApp worker has exited, end the other
        and unregister the node with `flwr supernode unregister`.

        The SuperLink then answers the node's pending messages with Flower's NODE_UNAVAILABLE
        error at the ServerApp's next pull, and leaves it out of later rounds. Otherwise a
        SuperNode that was killed stays "online" until its heartbeats are overdue: in flwr
        1.41 a SuperNode sends one about every 20 s for a 30 s interval, and the SuperLink
        waits 2 intervals, up to 60 s; no flag or setting shortens that.
        """
        handled: set[int] = set()
        while not self._watch_stop.wait(interval):
            for i, group in enumerate(self.node_processes):
                if i in handled or all(p.proc.poll() is None for p in group):
                    continue
                handled.add(i)
                for p in group:
                    signal_process(p.pid, signal.SIGTERM)
                node_id = logged_node_id(group[0].log)
                _log.warning("fedtt: SuperNode %d (node %s) or its ClientApp worker exited; "
                             "unregistering the node", i, node_id)
                if node_id is not None and not self._watch_stop.is_set():
                    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                        self.flwr("supernode", "unregister", str(node_id), CONNECTION,
                                  timeout=30.0)

    # --- the Flower CLI ----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run `flwr ARGS` against this deployment's FLWR_HOME; its stdout (error if rc != 0)."""
        res = subprocess.run([executable("flwr"), *args], capture_output=True, text=True,
                             env=self.env, cwd=self.workdir, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res.stdout

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        out = self.flwr(*args, "--format", "json", timeout=timeout)
        return json.loads(out[out.index("{"):])

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> list[dict]:
        """Poll `flwr supernode ls` until `count` SuperNodes are online."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            nodes = self.flwr_json("supernode", "ls", CONNECTION).get("nodes", [])
            online = [n for n in nodes if str(n.get("status", "")).lower() == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(online)} of {count} SuperNodes online: {nodes}")
            for p in self.processes:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited; see {p.log}:\n{tail(p.log)}")
            time.sleep(1.0)

    def run(self, app_dir: str | Path, *, run_config: Mapping[str, Any] | None = None,
            timeout: float = 600.0) -> RunResult:
        """`flwr run` the app, stream its log until it ends, then read its `flwr ls` entry.

        `run_config` overrides keys already in the app's `[tool.flwr.app.config]`; it is
        passed as a TOML file (`--run-config file.toml`), so long multi-line strings such
        as a whole fedtt config survive (the `k=v` form cannot carry quotes or newlines).
        """
        start = time.monotonic()
        args = ["run", str(Path(app_dir).absolute()), CONNECTION]
        if run_config:
            path = self.workdir / f"run-config-{time.time_ns()}.toml"
            path.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n"
                                    for k, v in run_config.items()), encoding="utf-8")
            args += ["--run-config", str(path)]
        submitted = self.flwr_json(*args)
        run_id = int(submitted["run-id"])
        log = ""
        try:  # returns when the run ends; polling `flwr ls` below is the fallback
            log = self.flwr("log", str(run_id), CONNECTION, "--stream", timeout=timeout)
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            log = f"(flwr log: {exc})"
        entry = self.run_info(run_id)
        while not str(entry.get("status", "")).startswith("finished"):
            if time.monotonic() - start > timeout:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.flwr("stop", str(run_id), CONNECTION)  # else `stop` ends it
                raise DeploymentTimeout(run_id, str(entry.get("status", "")), timeout)
            time.sleep(2.0)
            entry = self.run_info(run_id)
        traffic = entry.get("network-traffic", {})
        return RunResult(run_id=run_id, status=str(entry["status"]),
                         inbound_bytes=int(traffic.get("inbound-bytes", 0)),
                         outbound_bytes=int(traffic.get("outbound-bytes", 0)),
                         total_bytes=int(traffic.get("total-bytes", 0)),
                         seconds=time.monotonic() - start, listing=entry, log=log)

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's entry in `flwr ls --run-id ID --format json`."""
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        return next((r for r in runs if int(r["run-id"]) == run_id), {})
