"""Process plumbing for `LocalDeployment`: ports, executables, signals and finding processes.

A deployment starts each process in a session of its own (its pid is its process group id),
marks it and everything it starts with an environment variable (`MARKER`), and on stopping
signals whole groups and finds the rest through /proc; see `LocalDeployment.stop`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "FEDTT_DEPLOYMENT"  # environment variable: which LocalDeployment a process belongs to


@dataclass
class Process:
    """A process this module started, in its own session (its pid is its group id)."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str,
              log: Path) -> None:
    """Until `host:port` accepts connections; an error if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n"
                               + tail(log))
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {host}:{port} in {timeout:.0f} s; see {log}")


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file ("" if it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def executable(name: str) -> str:
    """An executable next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the starting thread dies, so a
    hard-killed test run does not leave a SuperLink or SuperNode behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def signal_process(pid: int, sig: signal.Signals) -> None:
    """Signal `pid`'s whole process group if it leads one, else `pid` alone (a `flwr` CLI
    call, say, shares this process's group)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def marked_pids(entry: str) -> set[int]:
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


def logged_node_id(log: Path) -> int | None:
    """The node id a SuperNode logs once it is connected ("SuperNode ID: N"), if it got there."""
    try:
        with log.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if found := re.search(r"SuperNode ID: (\d+)", line):
                    return int(found.group(1))
    except OSError:
        pass
    return None
