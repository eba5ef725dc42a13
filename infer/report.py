"""Benchmark reporting: markdown tables, machine description, and report sections.

A benchmark writes its section (and plots beside it) into runs/benchmarks/benchmarks.md unless
asked for the published docs/benchmarks.md with --docs, so a quick try never replaces published figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys

import jax

from redrafter_jax import rows_matmul
from redrafter_jax.files import write_text

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
SCRATCH_MD = os.path.join("runs", "benchmarks", "benchmarks.md")


def add_report_args(p: argparse.ArgumentParser) -> None:
    """--report PATH (default runs/benchmarks/benchmarks.md) or --docs (the repository's docs/benchmarks.md)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--report", default=SCRATCH_MD, help=f"markdown file the tables go to, plots beside it "
                                                            f"(default {SCRATCH_MD})")
    where.add_argument("--docs", dest="report", action="store_const", const=BENCHMARKS_MD,
                       help="publish: write into the repository's docs/benchmarks.md and docs/*.png")


def beside(report: str, name: str) -> str:
    """Path of a plot or other file that goes next to the report."""
    return os.path.join(os.path.dirname(os.path.abspath(report)), name)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture: timings differ between CPU vendors."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_unit() -> str:
    """The CPU's widest vector unit the kernels use (Linux x86), else "": they run 2-3x apart."""
    flags = rows_matmul.cpu_flags()
    units = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "avx512f": "AVX-512", "avx2": "AVX2"}
    return next((name for flag, name in units.items() if flag in flags), "")


def machine() -> str:
    """The device, jax and Python, and the XLA flags in effect (they change the compiled programs)."""
    dev = jax.devices()[0]
    cpu = ", ".join(filter(None, [f"{os.cpu_count()} cores", cpu_model(), vector_unit()]))
    kind = dev.device_kind if dev.platform != "cpu" else f"CPU ({cpu})"
    flags = os.environ.get("XLA_FLAGS", "").strip()
    named = f", XLA_FLAGS `{flags}`" if flags else ""
    return f"{kind}, jax {jax.__version__}, Python {platform.python_version()}{named}"


def table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces a report: `python -m module` with the arguments main() parsed
    (sys.argv's when run as a script; the list given when called from Python, e.g. a test or notebook)."""
    return "python -m " + " ".join(shlex.quote(a) for a in [module, *(sys.argv[1:] if argv is None else argv)])


def write_section(name: str, body: str, path: str) -> None:
    """Replaces (or appends) the section between `<!-- name:begin -->` and `<!-- name:end -->` of the
    markdown file at path."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, text)
    print(f"wrote section {name!r} of {path}", file=sys.stderr)
