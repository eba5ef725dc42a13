"""A CPU kernel for the products of a few rows with a large weight: decode steps and tree verification.

XLA:CPU runs a one-row product as a matrix-vector product at memory speed, but 2-64 rows through a
general matrix multiply at about half that, so verifying a tree of N tokens cost ~2 one-token steps.
`csrc/rows_matmul.cc` streams each weight once per 12 rows (6 with AVX2) from a tile-packed copy
([O / 32, K, 32], `pack`) and sums every output in one fixed order, so a row's result does not depend on
how many rows share the call: the one-token step and the N-token verification compute bitwise the same
products.

The weights may be float32 or bfloat16. With bfloat16 weights x is rounded to bfloat16 as well, as GPUs
multiply, and the exact products are summed in float32: the tiles stream half the bytes, so a bfloat16
model decodes about twice as fast on a memory-bound CPU. Where the CPU multiplies bfloat16 itself
(`bf16_unit`), bfloat16 tiles are packed as k-pairs and its unit computes the products: AMX's tile unit
(Intel Sapphire Rapids and later) 16 rows in about the time one row's weights take to stream, so
verifying a tree costs little more than one token, or else AVX512-BF16's dot products (AMD Zen 4 and
later, Intel Cooper Lake), two products per lane and instruction, so that the products of many rows
(large trees, prefills) cost about 60% of the FMA loop's. Either way a row's result does not depend on
the rows that share the call.

Every product is grouped: a layer's experts are packed as one weight each ([E, ...] tiles) and a call
multiplies each expert's run of rows (sorted by expert, `sizes` of them) by its weight, streaming only
the experts with rows (so a scan over a stack of layers, one weight per layer, gives all rows to its
layer's: `Packed.layer`, `model.LayerStack`). Experts kept in MXFP4 (`pack_mxfp4`) stay 4-bit codes
with their scales, decoded as they stream into the float32 kernel's chain of products, so theirs are
bitwise the dequantized weights'.

It is an XLA FFI custom call, compiled on first use with the system C++ compiler into the cache folder
(one library with the CPU attention kernel, `cpu_attention.py`), and used only where `enabled()` says
so: float32 or bfloat16 weights on the CPU, without a mesh. REDRAFTER_CPU_KERNEL=0 turns both off;
without a compiler, decoding falls back to XLA's products. It is built for this CPU (`-march=native`),
whose vector registers set its blocking (`csrc/simd.h`: 16 floats with AVX-512, 8 with AVX2, 4 with
SSE or NEON); REDRAFTER_CPU_MARCH names another GCC `-march` (e.g. x86-64-v3, a fleet's common ISA).
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

from redrafter_jax.mxfp4 import GROUP, Mxfp4
from redrafter_jax.wheels import sha256, writable_cache

TILE = 32  # output columns per packed tile (csrc/rows_matmul.cc's kTile)
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("rows_matmul.cc", "attention.cc")  # compiled into one library
HEADERS = ("parallel.h", "simd.h")  # what they share: part of the library's cache key
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)
TARGETS = {jnp.dtype(jnp.float32): "redrafter_rows_matmul", jnp.dtype(jnp.bfloat16): "redrafter_rows_matmul_bf16"}
# bfloat16 tiles as k-pairs, by the unit that multiplies them (compiled where the CPU has it)
PAIRS_TARGETS = {"AMX": "redrafter_rows_matmul_amx", "AVX512-BF16": "redrafter_rows_matmul_dpbf16"}
PAIR_K = 32  # k per AMX tile product: K is zero-padded to a multiple of it (csrc/rows_matmul.cc's kPairK)
PACK_TARGETS = {jnp.dtype(jnp.float32): "redrafter_pack_tiles", jnp.dtype(jnp.bfloat16): "redrafter_pack_tiles_bf16"}
MXFP4_TARGETS = ("redrafter_rows_matmul_mxfp4", "redrafter_pack_mxfp4")  # products, packing
ATTENTION_TARGET = "redrafter_attention"  # cpu_attention.py


@struct.dataclass
class Packed:
    """A weight [K, *out] stored as 32-column tiles (O = prod(out), zero-padded), float32 or bfloat16:
    [ceil(O / 32), K, 32], or with `pairs` (for `bf16_unit`) [ceil(O / 32), Kp / 2, 64], k-pairs of each
    column side by side and K zero-padded to Kp, a multiple of PAIR_K; or MXFP4 weights (`pack_mxfp4`)
    as 4-bit codes, tiles [ceil(O / 32), K / 32, 32, 16] uint8, with `scales` [ceil(O / 32), K / 32, 32]
    (csrc/rows_matmul.cc). Grouped (a mixture's experts, or one weight per layer of a `model.LayerStack`), G
    such weights: tiles [G, ceil(O / 32), ...]. A stack's weights with `layer` set are one weight, layer's:
    its products read it in place in the stack (the kernel streams only the weights with rows)."""

    tiles: jax.Array
    k: int = struct.field(pytree_node=False)
    out: tuple[int, ...] = struct.field(pytree_node=False)
    pairs: bool = struct.field(pytree_node=False, default=False)
    scales: jax.Array | None = None
    layer: jax.Array | None = None  # int32 [], possibly traced (a scan over the layers' counter)

    @property
    def has_groups(self) -> bool:
        """Whether the tiles hold G weights (a leading axis): a grouped weight's, or a stack's."""
        return self.tiles.ndim == (5 if self.scales is not None else 4)

    @property
    def grouped(self) -> bool:
        """Whether products take rows in runs, one per weight (`matmul`'s sizes)."""
        return self.has_groups and self.layer is None


def pack(w: jax.Array, transposed: bool = False, pairs: bool | None = None, grouped: bool = False) -> Packed:
    """float32 or bfloat16 w [K, *out] (or, transposed, w [O, K], e.g. an embedding as the LM head; or,
    grouped, w [G, K, *out], e.g. a layer's experts) -> Packed of the same dtype: a copy made by the kernel
    library (`generate.decoding_params` keeps one per params). `pairs`: the k-pairs layout, by default for
    bfloat16 weights where `bf16_unit()`."""
    check_available("packed weights")
    if w.dtype not in WEIGHT_DTYPES or (transposed and (w.ndim != 2 or grouped)) or w.ndim < 2 + grouped:
        raise ValueError(f"rows_matmul packs float32 or bfloat16 weights [K, *out], grouped [G, K, *out] or, "
                         f"transposed, [O, K]; got {w.dtype}{list(w.shape)}")
    if pairs is None:
        pairs = pairs_layout(w.dtype)
    elif pairs and (w.dtype != jnp.bfloat16 or not bf16_unit()):
        raise ValueError(f"the k-pairs layout needs bfloat16 weights on a CPU with a bfloat16 unit (bf16_unit(): "
                         f"{bf16_unit()}), got {w.dtype}")
    groups = w.shape[:1] if grouped else ()
    k, out = (w.shape[1], w.shape[:1]) if transposed else (w.shape[len(groups)], w.shape[len(groups) + 1:])
    o = math.prod(out)
    shape = (-(-o // TILE), -(-k // PAIR_K) * PAIR_K // 2, 2 * TILE) if pairs else (-(-o // TILE), k, TILE)
    tiles = jax.ffi.ffi_call(PACK_TARGETS[w.dtype], jax.ShapeDtypeStruct((*groups, *shape), w.dtype))(
        w.reshape(-1, k) if transposed else w.reshape(*groups, k, o), transposed=transposed, pairs=pairs)
    return Packed(tiles, k, tuple(out), pairs)


def pack_mxfp4(w: Mxfp4) -> Packed:
    """A mixture's MXFP4 experts w [E, K, *out] (`mxfp4.Mxfp4`, stored with their input axis last, the
    others in our order) -> grouped Packed MXFP4 tiles, 4.25 bits a weight as stored: their products are
    those of the dequantized float32 weights, bitwise."""
    check_available("packed MXFP4 weights")
    n = len(w.order)
    if w.order != (n - 1, *range(n - 1)) or w.blocks.ndim != n + 2:
        raise ValueError(f"pack_mxfp4 takes a mixture's MXFP4 experts [E, *out, K / 32, 16] (input axis last), got "
                         f"blocks {list(w.blocks.shape)} in the order {w.order}")
    e, *out, blocks = w.scales.shape
    o = math.prod(out)
    shape = (e, -(-o // TILE), blocks)
    codes, scales = jax.ffi.ffi_call(MXFP4_TARGETS[1], (jax.ShapeDtypeStruct((*shape, 32, 16), jnp.uint8),
                                                        jax.ShapeDtypeStruct((*shape, 32), jnp.uint8)))(
        w.blocks.reshape(e, o, blocks, 16), w.scales.reshape(e, o, blocks))
    return Packed(codes, blocks * GROUP, tuple(out), scales=scales)


def matmul(x: jax.Array, w: Packed, sizes: jax.Array | None = None) -> jax.Array:
    """float32 x [..., K] @ w -> float32 [..., *w.out] (x rounded to bfloat16 for bfloat16 weights). Grouped
    w: x [M, K] in runs of sizes [G] int32 rows (summing to M), run g times weight g (a layer's expert
    rows sorted by expert); the kernel streams only the weights with rows."""
    check_available("packed weights")
    lead, k = x.shape[:-1], x.shape[-1]
    mxfp4 = w.scales is not None
    tiles = w.tiles.shape[int(w.has_groups)]
    if w.k != k or x.dtype != jnp.float32 or (w.tiles.dtype not in WEIGHT_DTYPES and not mxfp4):
        raise ValueError(f"rows_matmul needs float32 x [..., K] and float32 or bfloat16 weight tiles of K = {w.k}, "
                         f"got x {x.dtype}{list(x.shape)} and tiles {w.tiles.dtype}{list(w.tiles.shape)}")
    if w.grouped != (sizes is not None) or (sizes is not None and (x.ndim != 2 or sizes.shape != w.tiles.shape[:1])):
        raise ValueError(f"grouped weights need x [M, K] and sizes [G] (G = {w.tiles.shape[0]}), and others no sizes; "
                         f"got x {list(x.shape)}, tiles {list(w.tiles.shape)}, sizes "
                         f"{None if sizes is None else list(sizes.shape)}")
    rows = x.reshape(-1, k)
    if w.layer is not None:  # all rows through the stack's weight `layer`
        sizes = jnp.zeros(w.tiles.shape[:1], jnp.int32).at[w.layer].set(rows.shape[0])
    elif sizes is None:
        sizes = jnp.full((1,), rows.shape[0], jnp.int32)
    # Every row goes to the kernel, however many: a batch's tree verification must compute each row as
    # the one-token step does (XLA's products of more rows sum in another order)
    target = MXFP4_TARGETS[0] if mxfp4 else PAIRS_TARGETS[bf16_units()[0]] if w.pairs else TARGETS[w.tiles.dtype]
    weights = [a if w.has_groups else a[None] for a in (w.tiles, w.scales) if a is not None]  # the kernels' [G, ...]
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], tiles * TILE), jnp.float32))(
        rows, *weights, sizes.astype(jnp.int32))
    return y[:, :math.prod(w.out)].reshape(*lead, *w.out)


def check_available(what: str) -> None:
    """Raises, naming `what` needed them, where the CPU kernels' library could not be built."""
    if not available():
        raise RuntimeError(f"{what} needs the CPU kernels, which are unavailable (see the warning)")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo: x86 "flags", Arm "Features"; elsewhere none)."""
    if not os.path.exists("/proc/cpuinfo"):
        return frozenset()
    with open("/proc/cpuinfo") as f:
        line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def cpu_signature() -> str:
    """The CPU's features as one string: what code compiled for this CPU is keyed by (the kernels; the
    scripts' compiled programs, `cli.keep_compiled_programs`)."""
    return " ".join(sorted(cpu_flags()))


def find_compiler() -> str:
    """The C++ compiler that builds the kernels: $CXX, else c++ or g++."""
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not found:
        raise OSError("no C++ compiler (c++ or g++, or $CXX) found")
    return found


def _compile() -> str:
    """Builds the kernel for this machine once (cached by source, compiler flags, CPU and jaxlib)."""
    compiler = find_compiler()
    march = os.environ.get("REDRAFTER_CPU_MARCH", "native")
    # -w: a user cannot act on a warning, and one could crowd the error out of the message below; the sources
    # are kept free of warnings by a test (test_rows_matmul: -Wall -Wextra -Werror, every build).
    flags = ["-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    cpu = cpu_signature()
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
def _library() -> ctypes.CDLL | None:
    """The kernel library, built and its targets registered (once per process; warns once if it cannot be)."""
    try:
        lib = ctypes.cdll.LoadLibrary(_compile())
    except OSError as e:
        warnings.warn(f"the CPU kernels are unavailable ({e}); decoding uses XLA's matrix products and attention")
        return None
    pairs_kernels = [t for t in PAIRS_TARGETS.values() if hasattr(lib, t)]  # compiled where the CPU has the unit
    for target in (*TARGETS.values(), *PACK_TARGETS.values(), *MXFP4_TARGETS, ATTENTION_TARGET, *pairs_kernels):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernel is built and registered."""
    return _library() is not None


def vector_lanes() -> int | None:
    """Floats per vector register of the unit the kernels were built for (None where they could not be)."""
    lib = _library()
    if lib is None:
        return None
    lib.redrafter_vector_lanes.restype = ctypes.c_int64
    return lib.redrafter_vector_lanes()


@functools.cache
def bf16_units() -> tuple[str, ...]:
    """The CPU's bfloat16 units this process has a k-pairs kernel for, preferred first, whatever
    REDRAFTER_BF16_UNIT says (tiles packed before it was set still need one): "AMX" where the library
    has its kernel and Linux grants this process the tile registers, "AVX512-BF16" where the library
    has that kernel (compiled where the CPU has the unit)."""
    lib = _library()
    return () if lib is None else tuple(
        unit for unit, target in PAIRS_TARGETS.items() if hasattr(lib, target) and
        (unit != "AMX" or lib.redrafter_amx_ready()))


def bf16_unit() -> str | None:
    """The unit that multiplies bfloat16 weights packed as k-pairs: the first of `bf16_units()`, or None
    where there is none or REDRAFTER_BF16_UNIT is "0" (read at each call)."""
    units = () if os.environ.get("REDRAFTER_BF16_UNIT") == "0" else bf16_units()
    return units[0] if units else None


def pairs_layout(dtype) -> bool:
    """Whether weights of `dtype` are packed as k-pairs: bfloat16 where `bf16_unit()` (`pack`'s default;
    the decode loops decide it before their jitted packing, so that REDRAFTER_BF16_UNIT is read each call)."""
    return jnp.dtype(dtype) == jnp.bfloat16 and bf16_unit() is not None


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
def turned_off(unit_only: bool = False):
    """Decoding params made inside use XLA's products (REDRAFTER_CPU_KERNEL=0), or with unit_only the rows
    kernel without the CPU's bfloat16 unit (REDRAFTER_BF16_UNIT=0), e.g. to compare both in one run."""
    name = "REDRAFTER_BF16_UNIT" if unit_only else "REDRAFTER_CPU_KERNEL"
    old = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
