"""The ``shear`` command line: one subcommand per job, each registered by the module that runs it.

Each module in ``COMMANDS`` exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed args, returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "shear.commands",  # run, recipes, quickstart
    "shear.eval.commands",  # eval
    "shear.analyze.commands",  # analyze, export
    "shear.prune.commands",  # prune
    "shear.train.commands",  # train
]


def build_parser() -> argparse.ArgumentParser:
    from shear import __version__

    p = argparse.ArgumentParser(prog="shear", description="Structured pruning and distillation for HF language models.")
    p.add_argument("--version", action="version", version=f"shear {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no traceback
        print(f"shear {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
