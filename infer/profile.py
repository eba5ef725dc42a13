"""Where a decode step's time goes: generate() run under the JAX profiler, the time of its decode
loop's ops summed by the step's parts.

The decode loop and its steps' parts are named scopes (`generate.LOOP_SCOPE`; propose, pack, verify,
accept, commit in `generate.speculative_step`; forward, select, commit in `autoregressive_step`), and
every op of the compiled program keeps its scope in its metadata (`generate.lower(...).compile()`).
A trace of the real run times each op as the loop runs it (buffers updated in place, no dispatch per
call, XLA's fusions across the parts), which timing each part jitted on its own does not. A fusion
that spans two parts counts for the part of its root op; the loop's ops outside the parts (its
condition, XLA's copies of its state) are "the rest". On a GPU the device's kernels are timed, so the gaps
between launches are not in the sum."""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import re
import tempfile

import jax

from redrafter_jax import generate as gen

SPECULATIVE_PARTS = ("propose", "pack", "verify", "accept", "commit")
AUTOREGRESSIVE_PARTS = ("forward", "select", "commit")
REST = "the rest"
CONTROL_FLOW = ("while", "conditional", "call")  # their ops are timed on their own


def _instructions(hlo: str) -> tuple[str, dict[str, tuple[str, str, bool]]]:
    """An optimised HLO module's text -> (its name, {instruction: (opcode, op_name, whether it runs in
    the decode loop)}). An op XLA left unnamed takes the op_name of its computation's root, else of
    its first named operand; the loop is the while named `generate.LOOP_SCOPE` with every computation
    its body and condition call (XLA's copies of the loop's state have no name, only a place)."""
    module = re.match(r"HloModule (\S+?),", hlo).group(1)
    computation, members, roots, ops = "", collections.defaultdict(list), {}, {}
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        m = re.match(r"^\s*(ROOT )?%(\S+) = .*?\s([a-z][a-z0-9-]*)\((.*)$", line)
        if header:
            computation = header.group(1)
        elif m:
            name = re.search(r'op_name="([^"]*)"', m.group(4))
            called = re.findall(r"(?:body|condition|calls|to_apply|computations?)=\{?((?:%[\w.-]+(?:, )?)+)", m.group(4))
            ops[m.group(2)] = [m.group(3), name.group(1) if name else "",
                               [c.strip("%") for group in called for c in group.split(", ")],
                               re.findall(r"%([\w.-]+)", m.group(4).split(")")[0])]
            members[computation].append(m.group(2))
            if m.group(1):
                roots[computation] = m.group(2)

    @functools.cache
    def op_name(i: str) -> str:
        _, name, called, operands = ops[i]
        return name or next((n for n in (*(op_name(roots[c]) for c in called if c in roots),
                                         *(op_name(o) for o in operands if o in ops)) if n), "")

    inside = set()
    todo = [c for i, (opcode, name, called, _) in ops.items() if opcode == "while"
            and name.split("/")[-2:] == [gen.LOOP_SCOPE, "while"] for c in called]
    while todo:
        c = todo.pop()
        if c not in inside:
            inside.add(c)
            todo += [d for i in members[c] for d in ops[i][2]]
    in_loop = {i for c in inside for i in members[c]}
    return module, {i: (op[0], op_name(i), i in in_loop) for i, op in ops.items()}


def part_of(op_name: str, parts: tuple[str, ...]) -> str:
    """The step part an op of the decode loop belongs to: its first scope among `parts` inside the
    loop (`generate.LOOP_SCOPE`), else REST."""
    scopes = op_name.split("/")
    inside = scopes[scopes.index(gen.LOOP_SCOPE) + 1:] if gen.LOOP_SCOPE in scopes else []
    return next((s for s in inside if s in parts), REST)


def _trace_events(directory: str) -> list[dict]:
    """Complete events of the trace written to `directory`, each with its process' name as "pname"."""
    (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [{**e, "pname": names.get(e.get("pid"), "")} for e in events if e.get("ph") == "X"]


def step_profile(params, cfg, prompts, parts: tuple[str, ...], **kwargs) -> dict:
    """generate(params, cfg, prompts, **kwargs) profiled (after a run that compiles it): ({part: (ms per
    step, ops per step)} for `parts` and REST, the number of steps)."""
    module, ops = _instructions(gen.lower(params, cfg, prompts, **kwargs).compile().as_text())
    jax.block_until_ready(gen.generate(params, cfg, prompts, **kwargs))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            steps = int(jax.block_until_ready(gen.generate(params, cfg, prompts, **kwargs)).num_steps)
        events = [e for e in _trace_events(d) if e.get("args", {}).get("hlo_module") == module]
    on_device = [e for e in events if e["pname"].startswith("/device:")]
    ms, count = collections.Counter(), collections.Counter()
    for e in on_device or events:  # a GPU's kernels, or the CPU's thunks
        opcode, op_name, in_loop = ops.get(e["args"]["hlo_op"], ("", "", False))
        if in_loop and opcode not in CONTROL_FLOW:
            part = part_of(op_name, parts)
            ms[part] += e["dur"] / 1e3
            count[part] += 1
    if not ms:
        raise RuntimeError(f"the trace timed no op of {module} (is the profiler available on "
                           f"{jax.devices()[0].platform}?)")
    return {p: (ms[p] / steps, count[p] / steps) for p in (*parts, REST)}, steps
