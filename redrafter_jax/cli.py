"""Command-line plumbing shared by the infer/ and train/ scripts: choosing the target model and the
drafter, keeping compiled programs between runs, and reporting a failure as one line on stderr with a
non-zero exit (--debug: the traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable

import jax

from redrafter_jax.config import ModelConfig, SpecConfig
from redrafter_jax.loaders import OpenedModel
from redrafter_jax.rows_matmul import cpu_signature
from redrafter_jax.wheels import writable_cache

OOM_HINT = ("out of memory; try fewer or shorter beams (--beam-width, --lookup-beams, --beam-length, --tree-budget), "
            "fewer new tokens or a smaller batch")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, so that a bad count is refused before anything loads."""

    def parse(text: str) -> int:
        n = int(text)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    parse.__name__ = "int"  # argparse's message for text that is no integer: "invalid int value"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (NaN refused too)."""
    x = float(text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return x


fraction.__name__ = "float"


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{\"name\": value, ...}}), got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dequantize-experts", action="store_true",
                   help="load experts stored in MXFP4 (GPT-OSS's) as --dtype weights, 4-8x their memory, "
                        "instead of keeping them in MXFP4 and dequantizing them where they multiply")
    p.add_argument("--chat-template-kwargs", metavar="JSON", type=json_object, default={},
                   help="more variables for the model's chat template, as transformers' apply_chat_template "
                        "takes them (e.g. '{\"enable_thinking\": false}' for Qwen3): every chat the command "
                        "renders sees them")
    p.add_argument("--mesh", metavar="DxM", default=None,
                   help="run over D x M devices: the batch split D ways, the model tensor-parallel M ways "
                        "(e.g. 1x8, 2x4; default: one device)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="join a multi-host job first (jax.distributed): the coordinator's address with "
                        "--num-processes and --process-id, or 'auto' to read them from the cluster (SLURM, "
                        "Open MPI, Kubernetes, Cloud TPU); every process runs the same command")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """p.parse_args(argv) for a command with `add_model_args`; a multi-host job (--coordinator) joins at
    once, since jax.distributed must start before anything touches a device (a datastore's arrays, a
    drafter, jax.devices())."""
    args = p.parse_args(argv)
    if args.coordinator:
        from redrafter_jax.sharding import start_processes

        start_processes(args.coordinator, args.num_processes, args.process_id)
    return args


def open_model(args: argparse.Namespace) -> OpenedModel:
    """The model the flags name, its config read; `.load()` loads each parameter straight onto its devices
    (its shards with --mesh). Check what needs only the config in between: loading a large model takes
    minutes."""
    from redrafter_jax.sharding import parse_mesh

    mesh = parse_mesh(args.mesh) if args.mesh else None
    if args.hf:
        from redrafter_jax.loaders.hf import open_hf

        opened = open_hf(args.hf, args.dtype, mesh, args.dequantize_experts)
    elif args.gguf:
        from redrafter_jax.loaders.gguf import open_gguf

        opened = open_gguf(args.gguf, args.dtype, mesh, args.dequantize_experts)
    else:
        from redrafter_jax.loaders.embedded import open_default

        opened = open_default(args.dtype, mesh)
    return opened._replace(tokenizer=opened.tokenizer.with_template_vars(**args.chat_template_kwargs))


# beside the packages, in the repository and in the wheel (pyproject.toml's package data)
DEFAULT_DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters", "smollm2-135m")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", nargs="?", const="default",
                   help="speculative decoding with this drafter: a checkpoint directory (ours or Apple's format), "
                        "'default' (or the bare flag: the drafter trained for the default model, "
                        "drafters/smollm2-135m), or 'random' (untrained, of the default drafter's shape: exact "
                        "output, next to nothing accepted); "
                        "with none of the beam options below, the setting that measured best on a CPU: "
                        "4 x 3 + 1 lookup beam of 8 tokens, the 7 best-scored nodes")
    p.add_argument("--beam-width", type=int, default=None, help="drafter beams W (default 2 with --drafter, else 0)")
    p.add_argument("--beam-length", type=int, default=None,
                   help="tokens per beam, the init token included (default 4)")
    p.add_argument("--lookup-beams", type=int, default=None,
                   help="K beams copied from the text so far (prompt + generated): what followed earlier "
                        "occurrences of its last tokens (default 1 with --drafter, else 0)")
    p.add_argument("--lookup-length", type=int, default=None,
                   help="tokens per lookup beam, the init token included (default: the beam length)")
    p.add_argument("--lookup-ngram", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                   help="lengths of the suffix looked up, longest first (default 1 3)")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="packed tree slots, filled with the best-scored nodes at any depth "
                        "(default 1 + W(L-1) + K(lookup length - 1): every node)")
    p.add_argument("--spec", default=None, metavar="WxL[+K[xL']][+DxL''ds][:N][/M]",
                   help="the beam options above in the benchmarks' notation, instead of them: e.g. 4x3+1x16:12 "
                        "(4 drafter beams of 3 tokens, 1 lookup beam of 16, the 12 best-scored nodes; what "
                        "measured best for replies of 512 tokens on a CPU), 0x8+1 (lookup only), "
                        "4x3+1x8+1x8ds:7 (and a datastore beam of 8), 8x5/16 (33 nodes verified in 48 slots: "
                        "a round token count, which some GPU kernels run faster)")
    p.add_argument("--datastore", default=None, metavar="PATH",
                   help="a datastore of the target's own replies (python -m train.datastore): one more beam of "
                        "8 tokens, what most often followed the text's last few tokens there, in the same tree "
                        "(or D of L'' tokens with --spec ...+DxL''ds); without --drafter, lookup and datastore "
                        "beams alone")


def tree_setting(args: argparse.Namespace):
    """The SpecConfig from --spec or the beam options and the --datastore it reads, (None, None) when
    decoding is autoregressive (no tree option given); read before the model loads, so that a bad setting
    is refused at once (`load_drafter_for` checks the datastore's tokens against the target)."""
    options = (args.beam_width, args.beam_length, args.lookup_beams, args.tree_budget, args.lookup_length)
    beam_options = any(o is not None for o in options)
    if not (args.drafter or args.spec or args.datastore or beam_options):
        return None, None
    store = None
    if args.datastore:
        from redrafter_jax import datastore

        store = datastore.load(args.datastore)
    ngrams = dict(lookup_min_ngram=args.lookup_ngram[0], lookup_max_ngram=args.lookup_ngram[1])
    if args.spec and beam_options:
        raise ValueError("--spec gives the whole tree: pass it or the beam options (--beam-width, --beam-length, "
                         "--lookup-beams, --lookup-length, --tree-budget), not both")
    stored = store.one_beam() if store and not args.spec else {}  # --spec says how many, if any
    if args.spec:
        spec = SpecConfig.parse(args.spec, **ngrams)
    elif not beam_options:  # --drafter and/or --datastore alone
        # The setting that measured best on MT-Bench on the CPU at batch 1, greedy and sampling at 0.7 and
        # 1.0: 4 x 3 + 1 x 8 in 7 slots, the 7 best-scored nodes (`tree.py`):
        # down the lookup beam (8 tokens: a repeat often runs on) as far as the match makes it likely, the
        # rest from the drafter's beams of every depth; without a drafter, its lookup beam.
        spec = SpecConfig.default(1, **ngrams, **stored)
        if not args.drafter:
            spec = dataclasses.replace(spec, beam_width=0, beam_length=spec.lookup_len, lookup_length=None)
    else:
        width, length, lookup, budget, lookup_length = options
        spec = SpecConfig(width if width is not None else (2 if args.drafter else 0),
                          length if length is not None else 4, budget,
                          lookup_beams=lookup if lookup is not None else (1 if args.drafter else 0),
                          lookup_length=lookup_length, **ngrams, **stored)
    spec.check_proposers(bool(args.drafter), store)
    return spec, store


def load_drafter_for(args: argparse.Namespace, target: ModelConfig, store):
    """The drafter --drafter names (None without it), checked against the target, after checking that the
    `tree_setting` datastore's tokens are the target's."""
    if store is not None:
        store.check_vocab(target.vocab_size, args.datastore)
    if not args.drafter:
        return None
    name = args.drafter
    if name == "random":
        from redrafter_jax.drafter import untrained_drafter

        return untrained_drafter(target)
    from redrafter_jax.checkpoint import load_drafter

    return load_drafter(DEFAULT_DRAFTER if name == "default" else name, target)


def error_line(e: BaseException) -> str:
    """One line naming what went wrong."""
    text = str(e).strip()
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text:
        return OOM_HINT
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if not isinstance(e, (ValueError, OSError)) or not first else first


def keep_compiled_programs() -> str | None:
    """Turns on JAX's persistent compilation cache, so that a script run again loads the programs an
    earlier run compiled instead of compiling them (XLA takes seconds a program on a CPU, 5-13 s on an
    H200). Returns its folder: JAX_COMPILATION_CACHE_DIR where set, else the cache folder's
    xla/cpu-<hash of the CPU's features> (XLA:CPU compiles for this CPU's features, which JAX's cache
    key does not name, and a home folder may be shared by unlike machines); None where the cache is
    off (JAX_ENABLE_COMPILATION_CACHE=false) or the cache folder is not writable."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    if not jax.config.jax_compilation_cache_dir:
        try:
            root = writable_cache()
            cpu = hashlib.sha256(cpu_signature().encode()).hexdigest()[:12]
        except OSError:  # left off (the model's download names the problem if it needs the folder)
            return None
        jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla", f"cpu-{cpu}"))
    return jax.config.jax_compilation_cache_dir


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Runs a script's main(argv) with its compiled programs kept between runs (`keep_compiled_programs`);
    an error ends it with one line on stderr and exit status 1, unless --debug is among the arguments
    (then the traceback is shown)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    keep_compiled_programs()
    try:
        main([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # whatever read the output stopped (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit fails again
        sys.exit(1)
    except Exception as e:
        if debug:
            raise
        print(f"error: {error_line(e)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
