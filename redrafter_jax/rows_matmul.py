"""A CPU kernel for the products of a few rows with a large weight: decode steps and tree verification.

XLA:CPU runs a one-row product as a matrix-vector product at memory speed, but 2-64 rows through a
general matrix multiply at about half that, so verifying a tree of N tokens cost ~2 one-token steps.
`csrc/rows_matmul.cc` streams each weight once per 12 rows from a tile-packed copy ([O / 32, K, 32],
`pack`) and sums every output in one fixed order, so a row's result does not depend on how many rows
share the call: the one-token step and the N-token verification compute bitwise the same products.

The weights may be float32 or bfloat16: bfloat16 tiles stream half the bytes and are widened exactly to
float32 in registers (x, the sums and y stay float32), so a bfloat16 model decodes about twice as fast
on a memory-bound CPU and, like float32, computes a row the same whatever rows share the call.

It is an XLA FFI custom call, compiled on first use with the system C++ compiler (`-march=native`) into
the cache folder (one library with the CPU attention kernel, `cpu_attention.py`), and used only where
`enabled()` says so: float32 or bfloat16 weights on the CPU, without a mesh. REDRAFTER_CPU_KERNEL=0
turns both off; without a compiler, decoding falls back to XLA's products.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp
from flax import struct

from redrafter_jax.wheels import sha256, writable_cache

TILE = 32  # output columns per packed tile (csrc/rows_matmul.cc's kTile)
MAX_ROWS = 64  # more rows (a prefill, training) go to XLA's matrix multiply, which is faster there
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("rows_matmul.cc", "attention.cc")  # compiled into one library
HEADERS = ("parallel.h",)  # what they share: part of the library's cache key
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)
TARGETS = {jnp.dtype(jnp.float32): "redrafter_rows_matmul", jnp.dtype(jnp.bfloat16): "redrafter_rows_matmul_bf16"}
PACK_TARGETS = {jnp.dtype(jnp.float32): "redrafter_pack_tiles", jnp.dtype(jnp.bfloat16): "redrafter_pack_tiles_bf16"}
ATTENTION_TARGET = "redrafter_attention"  # cpu_attention.py


@struct.dataclass
class Packed:
    """A weight [K, *out] stored as 32-column tiles [ceil(O / 32), K, 32] (O = prod(out), zero-padded),
    float32 or bfloat16."""

    tiles: jax.Array
    out: tuple[int, ...] = struct.field(pytree_node=False)


def pack(w: jax.Array, transposed: bool = False) -> Packed:
    """float32 or bfloat16 w [K, *out] (or, transposed, w [O, K], e.g. an embedding as the LM head) ->
    Packed of the same dtype: a copy made by the kernel library (`generate.decoding_params` keeps one
    per params)."""
    check_available("packed weights")
    if w.dtype not in WEIGHT_DTYPES or (transposed and w.ndim != 2):
        raise ValueError(f"rows_matmul packs float32 or bfloat16 weights [K, *out] or, transposed, [O, K]; "
                         f"got {w.dtype}{list(w.shape)}")
    k, out = (w.shape[1], w.shape[:1]) if transposed else (w.shape[0], w.shape[1:])
    o = math.prod(out)
    shape = jax.ShapeDtypeStruct((-(-o // TILE), k, TILE), w.dtype)
    tiles = jax.ffi.ffi_call(PACK_TARGETS[w.dtype], shape)(w.reshape(-1, k) if transposed else w.reshape(k, o),
                                                           transposed=transposed)
    return Packed(tiles, tuple(out))


def matmul(x: jax.Array, w: Packed) -> jax.Array:
    """float32 x [..., K] @ w -> float32 [..., *w.out]."""
    check_available("packed weights")
    lead, k = x.shape[:-1], x.shape[-1]
    tiles = w.tiles.shape[0]
    if w.tiles.shape[1] != k or x.dtype != jnp.float32 or w.tiles.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"rows_matmul needs float32 x [..., K] and float32 or bfloat16 weight tiles "
                         f"[O / 32, K, 32], got x {x.dtype}{list(x.shape)} and tiles {w.tiles.dtype}"
                         f"{list(w.tiles.shape)}")
    rows = x.reshape(-1, k)
    if rows.shape[0] > MAX_ROWS:
        y = jnp.einsum("mk,tkc->mtc", rows, w.tiles, preferred_element_type=jnp.float32).reshape(rows.shape[0], -1)
    else:
        y = jax.ffi.ffi_call(TARGETS[w.tiles.dtype], jax.ShapeDtypeStruct((rows.shape[0], tiles * TILE), jnp.float32))(
            rows, w.tiles)
    return y[:, :math.prod(w.out)].reshape(*lead, *w.out)


def check_available(what: str) -> None:
    """Raises, naming `what` needed them, where the CPU kernels' library could not be built."""
    if not available():
        raise RuntimeError(f"{what} needs the CPU kernels, which are unavailable (see the warning)")


def _compile() -> str:
    """Builds the kernel for this machine once (cached by source, compiler flags, CPU and jaxlib)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise OSError("no C++ compiler (c++ or g++, or $CXX) found")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    sources = [os.path.join(CSRC, f) for f in SOURCES]
    hashed = [sha256(os.path.join(CSRC, f)) for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*hashed, compiler, *flags, cpu, jax.__version__]).encode())
    out = os.path.join(writable_cache(), "kernels", f"rows_matmul-{key.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        done = subprocess.run([compiler, *flags, *sources, "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: another process never loads a half-written library
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process; warns once if it cannot be)."""
    try:
        lib = ctypes.cdll.LoadLibrary(_compile())
    except OSError as e:
        warnings.warn(f"the CPU kernels are unavailable ({e}); decoding uses XLA's matrix products and attention")
        return False
    for target in (*TARGETS.values(), *PACK_TARGETS.values(), ATTENTION_TARGET):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    return True


def enabled(params, dtype, mesh) -> bool:
    """Whether decoding with these target params uses the kernel: float32 or bfloat16 weights on the
    CPU, no mesh, REDRAFTER_CPU_KERNEL not "0" (read at each call, so a benchmark can compare both ways
    in one run), and the kernel available."""
    if mesh is not None or jnp.dtype(dtype) not in WEIGHT_DTYPES or os.environ.get("REDRAFTER_CPU_KERNEL") == "0":
        return False
    leaf = jax.tree_util.tree_leaves(params)[0]
    devices = leaf.devices() if isinstance(leaf, jax.Array) else jax.devices()[:1]
    return all(d.platform == "cpu" for d in devices) and available()


@contextlib.contextmanager
def turned_off():
    """Decoding inside uses XLA's products (REDRAFTER_CPU_KERNEL=0), e.g. to compare both in one run."""
    old = os.environ.get("REDRAFTER_CPU_KERNEL")
    os.environ["REDRAFTER_CPU_KERNEL"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["REDRAFTER_CPU_KERNEL"]
        else:
            os.environ["REDRAFTER_CPU_KERNEL"] = old
