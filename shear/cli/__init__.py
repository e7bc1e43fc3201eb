"""The ``shear`` command line: one subcommand per job, one module per command group in this package.

The CLI is the top layer: it imports the library, nothing in the library imports it. Each module in
``COMMANDS`` exposes ``register(subparsers)``, which adds its parsers and sets ``func`` (called with
the parsed args, returns an exit code). ``main`` turns errors the user can fix into one line
(``shear: error: ...``, exit code 2) and Ctrl-C into exit code 130; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

COMMANDS = [
    "shear.cli.run",  # run, recipes, quickstart
    "shear.cli.eval",  # eval
    "shear.cli.analyze",  # analyze, export
    "shear.cli.prune",  # prune
    "shear.cli.train",  # train
    "shear.cli.sparsify",  # sparsify
    "shear.cli.compare",  # compare
    "shear.cli.convert",  # convert (GGUF -> HF directory)
]


# Errors whose message says what to fix; anything else is a bug or an environment problem.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    from shear import __version__

    p = argparse.ArgumentParser(prog="shear", description="Structured pruning and distillation for HF language models.")
    p.add_argument("--version", action="version", version=f"shear {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    for cmd in sub.choices.values():  # also accepted after the subcommand; SUPPRESS keeps a global --debug
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _take_late_overrides(parser, args, extra)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "debug", False):
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("shear: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - known kinds: one line; others: one line and how to see more
        msg = user_error(e)
        if msg is not None:
            print(f"shear: error: {msg}", file=sys.stderr)
            return 2
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"shear: unexpected error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _run(args) -> int:
    """The command, after its output directory (``-o`` / ``OUT``) is checked not to be a file."""
    from shear.rundir import check_output_dir

    for attr, flag in (("output_dir", "-o"), ("out", "OUT")):
        if getattr(args, attr, None):
            check_output_dir(getattr(args, attr), flag)
    return int(args.func(args) or 0)


def _take_late_overrides(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """``key=value`` given after an option (``shear run R -o OUT train.steps=3``) joins the overrides."""
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix (bad input, missing file), else None."""
    import yaml
    from pydantic import ValidationError

    if isinstance(e, ValidationError):  # a config built from flags: name its keys
        from shear.config import format_errors

        return format_errors(e, root=e.title)
    if isinstance(e, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(e).split())}"
    if isinstance(e, USER_ERRORS) or type(e).__name__ == "SafetensorError":
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # a full disk: the message names where and what to do
        return e.strerror if e.filename is None else str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
