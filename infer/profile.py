"""Where a decode step's time goes: generate() run under the JAX profiler, the time of its decode
loop's ops summed by the step's parts.

    python -m infer.profile --chat "Explain how a rainbow forms." --drafter [--dtype bfloat16] [--ops 4]

profiles the autoregressive and the speculative decoding of one prompt and prints their steps part by
part (with --ops N, each part's N costliest kinds of op: the CPU kernels by name, XLA's fusions).

The decode loop and its steps' parts are named scopes (`generate.LOOP_SCOPE`; propose, pack, verify,
accept, commit in `generate.speculative_step`; forward, select, commit in `autoregressive_step`), and
every op of the compiled program keeps its scope in its metadata (`generate.lower(...).compile()`).
A trace of the real run times each op as the loop runs it (buffers updated in place, no dispatch per
call, XLA's fusions across the parts), which timing each part jitted on its own does not. A fusion
that spans two parts counts for the part of its root op; the loop's ops outside the parts (its
condition, XLA's copies of its state) are "the rest". On a GPU the device's kernels are timed, so
the gaps between launches are not in the sum. One device: a mesh's devices would add up."""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import tempfile
from typing import NamedTuple

import jax
from tqdm import tqdm

from infer.report import table
from redrafter_jax import generate as gen
from redrafter_jax.cli import (
    add_model_args,
    add_spec_args,
    at_least,
    load_drafter_for,
    open_model,
    parse_args,
    run,
    tree_setting,
)

SPECULATIVE_PARTS = ("propose", "pack", "verify", "accept", "commit")
AUTOREGRESSIVE_PARTS = ("forward", "select", "commit")
REST = "the rest"
CONTROL_FLOW = ("while", "conditional", "call")  # their ops are timed on their own


class Op(NamedTuple):
    """An instruction of the compiled program."""

    opcode: str
    op_name: str  # its scopes, e.g. "jit(_speculative)/decode_loop/while/body/verify/add"
    in_loop: bool  # it runs in the decode loop
    kind: str  # what it runs: a custom call's target, else its name without the ".N" suffix


class StepProfile(NamedTuple):
    parts: dict[str, tuple[float, float]]  # part -> (ms per step, ops per step), the parts in step order
    kinds: dict[tuple[str, str], float]  # (part, Op.kind) -> ms per step
    steps: int


def _instructions(hlo: str) -> tuple[str, dict[str, Op]]:
    """An optimised HLO module's text -> (its name, its instructions by name). An op XLA left unnamed
    takes the op_name of its computation's root, else of its first named operand; the loop is the
    while named `generate.LOOP_SCOPE` with every computation its body and condition call (XLA's copies
    of the loop's state have no name, only a place)."""
    module = re.match(r"HloModule (\S+?),", hlo).group(1)
    computation, members, roots, ops = "", collections.defaultdict(list), {}, {}
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        m = re.match(r"^\s*(ROOT )?%(\S+) = .*?\s([a-z][a-z0-9-]*)\((.*)$", line)
        if header:
            computation = header.group(1)
        elif m:
            name = re.search(r'op_name="([^"]*)"', m.group(4))
            called = re.findall(r"(?:body|condition|calls|to_apply|computations?)=\{?((?:%[\w.-]+(?:, )?)+)",
                                m.group(4))
            target = re.search(r'custom_call_target="([^"]*)"', m.group(4))
            ops[m.group(2)] = [m.group(3), name.group(1) if name else "",
                               [c.strip("%") for group in called for c in group.split(", ")],
                               re.findall(r"%([\w.-]+)", m.group(4).split(")")[0]),
                               target.group(1) if target else re.sub(r"\.\d+$", "", m.group(2))]
            members[computation].append(m.group(2))
            if m.group(1):
                roots[computation] = m.group(2)

    @functools.cache
    def op_name(i: str) -> str:
        _, name, called, operands, _ = ops[i]
        return name or next((n for n in (*(op_name(roots[c]) for c in called if c in roots),
                                         *(op_name(o) for o in operands if o in ops)) if n), "")

    inside = set()
    todo = [c for i, (opcode, name, called, _, _) in ops.items() if opcode == "while"
            and name.split("/")[-2:] == [gen.LOOP_SCOPE, "while"] for c in called]
    while todo:
        c = todo.pop()
        if c not in inside:
            inside.add(c)
            todo += [d for i in members[c] for d in ops[i][2]]
    in_loop = {i for c in inside for i in members[c]}
    return module, {i: Op(op[0], op_name(i), i in in_loop, op[4]) for i, op in ops.items()}


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


def step_profile(params, cfg, prompts, parts: tuple[str, ...], **kwargs) -> StepProfile:
    """generate(params, cfg, prompts, **kwargs) profiled, after a run that compiles it: the time of its
    decode loop's ops per step by part (`parts` and REST) and by kind within each part."""
    module, ops = _instructions(gen.lower(params, cfg, prompts, **kwargs).compile().as_text())
    jax.block_until_ready(gen.generate(params, cfg, prompts, **kwargs))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            steps = int(jax.block_until_ready(gen.generate(params, cfg, prompts, **kwargs)).num_steps)
        # GPU traces may suffix the module's name and list several ops per kernel (a fusion's, a graph's)
        events = [e for e in _trace_events(d) if str(e.get("args", {}).get("hlo_module", "")).startswith(module)]
    on_device = [e for e in events if e["pname"].startswith("/device:")]
    ms, count, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    for e in on_device or events:  # a GPU's kernels, or the CPU's thunks
        op = next((ops[n] for n in re.split(r"[^\w.-]+", str(e["args"].get("hlo_op", ""))) if n in ops), None)
        if op and op.in_loop and op.opcode not in CONTROL_FLOW:
            part = part_of(op.op_name, parts)
            ms[part] += e["dur"] / 1e3 / steps
            count[part] += 1 / steps
            kinds[part, op.kind] += e["dur"] / 1e3 / steps
    if not ms:
        raise RuntimeError(f"the trace timed no op of {module} (is the profiler available on "
                           f"{jax.devices()[0].platform}?)")
    return StepProfile({p: (ms[p], count[p]) for p in (*parts, REST)}, dict(kinds.most_common()), steps)


def decodings(params, cfg, prompt: list[int], speculative: dict, max_new_tokens: int,
              desc: str = "step profiles") -> dict[str, StepProfile]:
    """`step_profile` of the autoregressive decoding of `prompt` (as "autoregressive", the unit `rows`
    costs in) and of each speculative setting of `speculative` {name: generate()'s keywords}."""
    runs = {"autoregressive": (AUTOREGRESSIVE_PARTS, {}),
            **{name: (SPECULATIVE_PARTS, kw) for name, kw in speculative.items()}}
    return {name: step_profile(params, cfg, [prompt], parts, max_new_tokens=max_new_tokens, **kw)
            for name, (parts, kw) in tqdm(runs.items(), desc=desc, leave=False)}


HEADERS = ["decoding", "part", "op", "ms per step", "ops per step", "cost / one AR step"]


def rows(found: dict[str, StepProfile], ops: int = 0) -> list[list]:
    """Table rows (HEADERS) of profiles by decoding, "autoregressive" among them (the unit of cost): each
    part, then its `ops` costliest kinds of op, then the whole step."""
    ar_step = sum(ms for ms, _ in found["autoregressive"].parts.values())
    out = []
    for name, prof in found.items():
        for part, (ms, n) in prof.parts.items():
            out.append([name, part, "", ms, n, ms / ar_step])
            top = [(kind, t) for (p, kind), t in prof.kinds.items() if p == part][:ops]
            out += [[name, part, kind, t, "", t / ar_step] for kind, t in top]
        whole = tuple(map(sum, zip(*prof.parts.values())))
        out.append([name, "whole step", "", whole[0], whole[1], whole[0] / ar_step])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--chat", required=True, help="a user message, wrapped in the model's chat template")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--ops", type=at_least(0), default=0, help="list each part's N costliest kinds of op")
    add_spec_args(p)
    args = parse_args(p, argv)
    if args.mesh:
        raise ValueError("--mesh: the profile times one device's decode loop; run it without --mesh")
    spec, store = tree_setting(args)
    if spec is None:
        raise ValueError("nothing speculative to profile: pass --drafter, --lookup-beams and/or --datastore")
    target = open_model(args)
    drafter = load_drafter_for(args, target.config, store)
    model = target.load()
    prompt = model.tokenizer.encode_chat([{"role": "user", "content": args.chat}])
    found = decodings(model.params, model.config, prompt, {f"speculative {spec.describe()}": dict(
        drafter=drafter, spec=spec, datastore=store)}, args.max_new_tokens)
    print(f"{args.dtype}, {found['autoregressive'].steps} autoregressive and "
          f"{found[list(found)[1]].steps} speculative steps, device {jax.devices()[0].device_kind}")
    print(table(HEADERS, rows(found, args.ops)))


if __name__ == "__main__":
    run(main)
