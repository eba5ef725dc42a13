"""Convert drafters between this project's checkpoints (orbax + drafter_config.json) and Apple's
ReDrafter format (config.json + model.safetensors, read by Apple's code and TensorRT-LLM's converter).

    python -m infer.convert apple-to-orbax path/to/apple_drafter drafters/imported
    python -m infer.convert orbax-to-apple drafters/mine path/to/apple_drafter
"""

from __future__ import annotations

import argparse

from redrafter_jax.apple import is_apple_drafter, load_apple_drafter, save_apple_drafter
from redrafter_jax.checkpoint import load_drafter, save_drafter
from redrafter_jax.cli import run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["apple-to-orbax", "orbax-to-apple"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination folder")
    args = p.parse_args(argv)
    if args.direction == "apple-to-orbax":
        if not is_apple_drafter(args.src):
            raise ValueError(f"{args.src} is not an Apple drafter (config.json + model.safetensors)")
        save_drafter(args.dst, load_apple_drafter(args.src), extra={"imported_from": args.src},
                     overwrite=args.overwrite)
    else:
        save_apple_drafter(args.dst, load_drafter(args.src), overwrite=args.overwrite)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    run(main)
