"""Run fedtt's unchanged ServerApp and ClientApp on Flower's Deployment Engine, on this machine.

`LocalDeployment` starts a SuperLink and N SuperNodes on free 127.0.0.1 ports (optionally with
TLS and SuperNode authentication), submits a generated Flower app directory with `flwr run`,
waits for the run, and reads Flower's traffic figures with `flwr ls --format json`. Whichever
way it ends (normally, on an exception, on SIGTERM or SIGINT) it stops every process it caused to
start, Flower's own children included, and deletes its private keys; see `LocalDeployment.stop`.

Why a ClientApp worker: in flwr 1.41 a `flwr-clientapp` process handles exactly one message
and exits, and the stock SuperExec (`--isolation subprocess`, or a separately started
`flower-superexec` with `--isolation process`) launches one per message, so every round would
rebuild the model in a fresh process. `serve_clientapps` takes the SuperExec's place for a
SuperNode started with `--isolation process`: one long-lived process acquires each ClientApp
task from the SuperNode's Runtime API and runs it in-process, so `get_runtime` builds the model
once per SuperNode and reuses it every round. It reuses flwr's own task helpers (pull the task
input, push the reply and the context), which the exact `flwr==1.41.0` pin keeps stable.

    python -m fedtt.federated.deploy clientapp-worker --runtime-api-address 127.0.0.1:PORT \
        --insecure            # or --root-certificates ca.pem when the Runtime API uses TLS
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
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
from fedtt.results import read_rounds

APP_NAME = "fedtt-deployment"
APP_PUBLISHER = "fedtt"
SERVERAPP = "fedtt.federated.server_app:app"
CLIENTAPP = "fedtt.federated.client_app:app"
CONNECTION = "fedtt-local"  # connection name in $FLWR_HOME/config.toml

DEFAULT_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else uv builds a per-run env
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# --- certificates and keys -----------------------------------------------------------------
@dataclass(frozen=True)
class Certificates:
    """PEM files: a self-signed CA and a server certificate/key that it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as flwr expects)."""

    private_key: Path
    public_key: Path


def make_self_signed_certs(directory: str | Path,
                           hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                           days: int = 7) -> Certificates:
    """Write a CA and a server certificate valid for `hosts` (IPs and DNS names) to `directory`.

    The CA's private key is never written: it signs the server certificate in memory and is
    dropped, so nothing can sign further certificates with it. The server key is written
    unencrypted (mode 600), as `flower-superlink --ssl-keyfile` reads it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtt local CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))

    certs = Certificates(out / "ca.crt", out / "server.pem", out / "server.key")
    certs.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    certs.server_key.chmod(0o600)
    return certs


def make_node_keys(directory: str | Path, name: str) -> NodeKeys:
    """Write an EC P-384 key pair in OpenSSH format (`flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` read these)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out / name, out / f"{name}.pub")
    keys.private_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    keys.private_key.chmod(0o600)
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return keys


# --- the Flower app directory ----------------------------------------------------------------
def fedtt_run_config(cfg: Any) -> dict[str, str]:
    """Flower run config carrying a fedtt RunConfig: its TOML text under `fedtt-config`.

    `output.dir` is made absolute first: the ServerApp runs in a process that the SuperLink
    starts, whose working directory is not the caller's.
    """
    from fedtt.config import to_toml
    from fedtt.federated.runtime import CONFIG_KEY

    cfg = copy.deepcopy(cfg)
    cfg.output.dir = str(Path(cfg.output.dir).absolute())
    return {CONFIG_KEY: to_toml(cfg)}


BUILD_LOG_MODULE = "fedtt_build_log"
_BUILD_LOG_SOURCE = '''"""fedtt's apps; one JSON line per model build (pid, time) in {path!r}."""

import json
import os
import time

from fedtt.federated import runtime
from fedtt.federated.client_app import app as clientapp
from fedtt.federated.server_app import app as serverapp

__all__ = ["clientapp", "serverapp"]
_build = runtime.Runtime.__init__


def _logged_build(self, cfg):
    start = time.time()
    _build(self, cfg)
    with open({path!r}, "a", encoding="utf-8") as out:
        out.write(json.dumps({{"pid": os.getpid(), "start": start,
                              "seconds": time.time() - start}}) + "\\n")


if not getattr(runtime.Runtime.__init__, "_fedtt_build_log", False):
    _logged_build._fedtt_build_log = True
    runtime.Runtime.__init__ = _logged_build
'''


def write_app_dir(directory: str | Path, run_config: Mapping[str, Any], *,
                  build_log: str | Path | None = None) -> Path:
    """Write a minimal Flower app directory: a `pyproject.toml` and nothing else.

    Its components are fedtt's installed apps, so the bundle holds no code. Flower requires
    `[project]` name and version, `[tool.flwr.app]` publisher and
    `[tool.flwr.app.components]` serverapp and clientapp. `run_config` becomes
    `[tool.flwr.app.config]`; a key with dots ("federation.rounds") is written quoted, so it
    stays one flat key, which fedtt reads as a `section.key` override. Only keys written here
    can be overridden with `flwr run --run-config`.

    `build_log` (instrumentation): also write a small module that wraps fedtt's apps and
    appends `{"pid", "start", "seconds"}` to that file each time a process builds the model
    (`Runtime.__init__`), and point the components at it; see `read_build_log`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    serverapp, clientapp = SERVERAPP, CLIENTAPP
    if build_log is not None:
        source = _BUILD_LOG_SOURCE.format(path=str(Path(build_log).absolute()))
        (out / f"{BUILD_LOG_MODULE}.py").write_text(source, encoding="utf-8")
        serverapp, clientapp = f"{BUILD_LOG_MODULE}:serverapp", f"{BUILD_LOG_MODULE}:clientapp"
    lines = [
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"',
        'description = "fedtt on the Flower Deployment Engine"', 'license = "Apache-2.0"', "",
        "[tool.flwr.app]", f'publisher = "{APP_PUBLISHER}"', "",
        "[tool.flwr.app.components]", f"serverapp = {toml_value(serverapp)}",
        f"clientapp = {toml_value(clientapp)}", "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in run_config.items()]
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def read_build_log(path: str | Path) -> list[dict[str, Any]]:
    """The model builds a `build_log` app recorded, one dict per build."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --- processes ---------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str,
               log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n"
                               + _tail(log))
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {host}:{port} in {timeout:.0f} s; see {log}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _bin(name: str) -> str:
    """An executable next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@dataclass
class Process:
    """A process this module started, in its own session (its pid is its group id)."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


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


def traffic_report(run_dir: str | Path, result: RunResult) -> dict[str, Any]:
    """Flower's byte counts for a run next to fedtt's ledger of the same run.

    Flower counts Fleet API payloads (protobuf messages and object contents, not HTTP or
    TLS framing) between the SuperLink and the SuperNodes: `inbound` is what the nodes
    sent (uploads), `outbound` what they received (downloads). The ledger counts each
    message as Flower deflates it (`wire_bytes`) and, inside it, the tensor payload
    (`bytes`); the ratios say how much the Fleet API adds on top of the messages. After
    `--resume`, only the rounds this Flower run made (those after `resumed_from_round` in
    summary.json) are set against its counts.
    """
    summary = Path(run_dir) / "summary.json"
    after = (json.loads(summary.read_text()).get("resumed_from_round")
             if summary.exists() else None)
    rounds = [r for r in read_rounds(run_dir) if after is None or r["round"] > after]

    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in rounds)

    up, down = total("upload_bytes"), total("download_bytes")
    up_wire, down_wire = total("upload_wire_bytes"), total("download_wire_bytes")
    return {
        "run_id": result.run_id,
        "rounds": [r["round"] for r in rounds],
        "flower": {"inbound_bytes": result.inbound_bytes,
                   "outbound_bytes": result.outbound_bytes,
                   "total_bytes": result.total_bytes},
        "ledger": {"upload_bytes": up, "download_bytes": down, "total_bytes": up + down,
                   "upload_wire_bytes": up_wire, "download_wire_bytes": down_wire,
                   "total_wire_bytes": up_wire + down_wire},
        "upload_ratio": result.inbound_bytes / up_wire if up_wire else None,
        "download_ratio": result.outbound_bytes / down_wire if down_wire else None,
        "overhead_ratio": (result.total_bytes / (up_wire + down_wire)
                           if up_wire + down_wire else None),
    }


MARKER = "FEDTT_DEPLOYMENT"  # environment variable: which LocalDeployment a process belongs to
_log = logging.getLogger(__name__)


class LocalDeployment:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1; used as a context manager.

    `warm=True` (default) starts each SuperNode with `--isolation process` plus one
    `clientapp-worker` from this module, so the model is built once per SuperNode;
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
    """

    def __init__(self, workdir: str | Path, num_nodes: int = 2, *, tls: bool = False,
                 node_auth: bool = False, warm: bool = True,
                 node_configs: Sequence[Mapping[str, Any]] | None = None,
                 env: Mapping[str, str] | None = None, startup_timeout: float = 60.0,
                 preload: Sequence[str] = ("fedtt.federated.client_app",)) -> None:
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
        cmd = [_bin("flower-superlink"), "--host", "127.0.0.1",
               "--port", str(self.superlink_port), "--disable-runtime-dependency-installation",
               *self._server_tls_args()]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        link = self._spawn("superlink", cmd)
        _wait_port("127.0.0.1", self.superlink_port, link.proc, self.startup_timeout,
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
        cmd = [_bin("flower-supernode"), "--superlink", self.address,
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
        _wait_port("127.0.0.1", port, node.proc, self.startup_timeout, f"supernode {i}",
                   node.log)
        if self.warm:
            worker = [sys.executable, "-m", "fedtt.federated.deploy", "clientapp-worker",
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
                                    start_new_session=True, preexec_fn=_die_with_parent)
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
                    _signal_process(pid, signal.SIGTERM)
                asked |= pids
            else:
                for pid in pids:
                    _signal_process(pid, signal.SIGKILL)
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
        return started | _marked_pids(f"{MARKER}={self.marker}")

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
                    _signal_process(p.pid, signal.SIGTERM)
                node_id = _logged_node_id(group[0].log)
                _log.warning("fedtt: SuperNode %d (node %s) or its ClientApp worker exited; "
                             "unregistering the node", i, node_id)
                if node_id is not None and not self._watch_stop.is_set():
                    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                        self.flwr("supernode", "unregister", str(node_id), CONNECTION,
                                  timeout=30.0)

    # --- the Flower CLI ----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run `flwr ARGS` against this deployment's FLWR_HOME; its stdout (error if rc != 0)."""
        res = subprocess.run([_bin("flwr"), *args], capture_output=True, text=True,
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
                    raise RuntimeError(f"{p.name} exited; see {p.log}:\n{_tail(p.log)}")
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


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the starting thread dies, so a
    hard-killed test run does not leave a SuperLink or SuperNode behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal_process(pid: int, sig: signal.Signals) -> None:
    """Signal `pid`'s whole process group if it leads one, else `pid` alone (a `flwr` CLI
    call, say, shares this process's group)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _marked_pids(entry: str) -> set[int]:
    """Processes other than this one whose environment holds `entry` ("NAME=value"), from
    /proc (Linux); none elsewhere. A process inherits its environment, so this finds what a
    process started, and what that started, in whatever session or group."""
    wanted = entry.encode()
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if wanted in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    found.discard(os.getpid())
    return found


def _logged_node_id(log: Path) -> int | None:
    """The node id a SuperNode logs once it is connected ("SuperNode ID: N"), if it got there."""
    try:
        with log.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if found := re.search(r"SuperNode ID: (\d+)", line):
                    return int(found.group(1))
    except OSError:
        pass
    return None


# --- the long-lived ClientApp worker ---------------------------------------------------------
def serve_clientapps(runtime_api_address: str, *, insecure: bool = True,
                     root_certificates: str | Path | None = None, poll_interval: float = 0.1,
                     stop: threading.Event | None = None, max_tasks: int | None = None) -> int:
    """Run every ClientApp task of a SuperNode (`--isolation process`) in this process.

    Does what `flower-superexec` + one `flwr-clientapp` per message do, minus the process
    per message: acquire a task token, pull the message and context, call the ClientApp
    (loaded once per app bundle, so module state such as fedtt's runtime cache survives),
    push the reply and the updated context. Returns the number of tasks run.
    """
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certs = Path(root_certificates).read_bytes() if root_certificates else None
    if certs is not None:
        insecure = False
    stop = stop or threading.Event()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certs,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    apps: dict[str, Any] = {}

    def client_app_for(run: Any, fab: Any) -> Any:
        if fab.hash_str not in apps:
            install_from_fab(fab.content, skip_prompt=True)
            apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return apps[fab.hash_str]

    done = 0
    try:
        while not stop.is_set() and (max_tasks is None or done < max_tasks):
            res = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                _run_task(runtime_api_address, res.token, insecure, certs, client_app_for)
                done += 1
                continue
            stop.wait(poll_interval)
    finally:
        client.close()
    return done


def _run_task(address: str, token: str, insecure: bool, certs: bytes | None,
              client_app_for: Any) -> None:
    """One ClientApp task, as `flwr-clientapp` runs it, without exiting the process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certs,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        reply = client_app_for(run, fab)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the node answers with an Error, as flwr-clientapp does
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"{type(exc)}:<'{exc}'>"
        log(logging.ERROR, "ClientApp raised an exception", exc_info=exc)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status,
                             details=details)
            heartbeat.stop()
            client.close()


def _watch_parent(pid: int, stop: threading.Event) -> None:
    def watch() -> None:
        while not stop.is_set():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)  # the SuperNode is gone: nothing left to serve
            stop.wait(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtt.federated.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("clientapp-worker",
                            help="serve a SuperNode's ClientApp tasks in one process")
    worker.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, host:port (its --port)")
    tls = worker.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", help="CA certificate (PEM) of the Runtime API")
    worker.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    worker.add_argument("--poll-interval", type=float, default=0.1)
    worker.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import MODULE before serving (e.g. the ClientApp's module, so "
                             "its imports are not paid inside the first round)")
    args = parser.parse_args(argv)
    for module in args.preload:
        importlib.import_module(module)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.parent_pid:
        _watch_parent(args.parent_pid, stop)
    serve_clientapps(args.runtime_api_address, insecure=args.insecure,
                     root_certificates=args.root_certificates,
                     poll_interval=args.poll_interval, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
