"""Subcommands ``shear run``, ``shear recipes`` and ``shear quickstart``, and the run flags ``shear train`` shares."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def recipes_root() -> Path:
    """The shipped ``recipes/`` directory: beside the package in a checkout, else under the cwd."""
    here = Path(__file__).resolve().parents[2] / "recipes"
    return here if here.is_dir() else Path.cwd() / "recipes"


def list_recipes(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, description) of every recipe YAML under ``root`` (accelerate configs excluded)."""
    root = root or recipes_root()
    rows = []
    for p in sorted(root.rglob("*.yaml")):
        if p.parent.name == "accelerate":
            continue
        data = yaml.safe_load(p.read_text()) or {}
        rows.append((str(p.relative_to(root)), str(data.get("description", "")).strip()))
    return rows


def _cmd_recipes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    root = Path(args.dir) if args.dir else recipes_root()
    if not root.is_dir():
        raise FileNotFoundError(f"no recipes directory at {root}")
    t = Table(title=f"recipes in {root}")
    t.add_column("recipe")
    t.add_column("purpose")
    for name, desc in list_recipes(root):
        t.add_row(name, desc)
    Console().print(t)
    return 0


def recipe_overrides(args) -> list[str]:
    """The command line's ``key=value`` overrides plus the flags that map to recipe keys."""
    return list(args.overrides) + (["model.trust_remote_code=true"] if args.trust_remote_code else [])


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """``--smoke``, ``--resume`` / ``--restart`` and ``--trust-remote-code``: shared by ``shear run`` and ``shear train``."""
    p.add_argument("--smoke", action="store_true",
                   help="check the recipe end to end in minutes: every stage, a few steps and samples, "
                        "outputs in OUTPUT_DIR-smoke (unless -o)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="the output dir holds a run of a changed recipe: continue it anyway (the change is recorded)")
    g.add_argument("--restart", action="store_true",
                   help="start the run over: delete what shear wrote in the output dir (checkpoints, reports) first")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped in a model directory (per-layer pruned exports carry auto_map)")


def run_interruptible(recipe, args) -> dict | int:
    """``run_recipe`` as the run directory flags say; Ctrl-C ends it with exit code 130 and where to resume."""
    import sys

    from shear.pipeline import run_recipe
    from shear.rundir import newest_checkpoint

    out = Path(args.output_dir or recipe.output_dir)
    try:
        return run_recipe(recipe, out, "resume" if args.resume else "restart" if args.restart else "refuse")
    except KeyboardInterrupt:
        pass
    import gc

    gc.collect()  # progress bars of the interrupted frames close (and print) now, before the last line
    ck = newest_checkpoint(out) if out.is_dir() else None
    where = f"last checkpoint: {ck} (the same command resumes from it)" if ck else "no checkpoint was written yet"
    lead = "\n" if sys.stderr.isatty() else ""  # a progress bar may hold the line
    print(f"{lead}shear: interrupted; {where}", file=sys.stderr)
    return 130


def load_run_recipe(args):
    """The recipe of ``shear run`` / ``shear train``: file, overrides, flags, then ``--smoke`` shrinking."""
    from shear.config import load_recipe, smoke_recipe

    recipe = load_recipe(args.recipe, recipe_overrides(args))
    return smoke_recipe(recipe) if args.smoke else recipe


def add_dry_run_flags(p: argparse.ArgumentParser) -> None:
    """``--dry-run`` and its planning options: shared by ``shear run`` and ``shear train``."""
    g = p.add_argument_group("dry run (nothing is trained, loaded or written)")
    g.add_argument("--dry-run", action="store_true",
                   help="build the models on the meta device and print, per rank: device, weights, gradients, "
                        "optimizer state, KD teacher, activations, KD logits, calibration cost, pruned size, "
                        "and whether it fits the GPUs (also under accelerate launch)")
    g.add_argument("--gpus", type=int, default=None, help="dry run: plan for N GPUs (one process each) instead of those seen")
    g.add_argument("--gpu-mem", default=None, help="dry run: memory per GPU, e.g. 80GB or 80GiB (default: the GPUs seen)")
    g.add_argument("--config-json", default=None,
                   help="dry run: config.json of the recipe's model (a hub id that is not available offline)")
    g.add_argument("--accelerate-config", default=None,
                   help="dry run: plan for this accelerate config (default: the launch, else the recipe's first line)")
    g.add_argument("--json", default=None, metavar="FILE", help="dry run: also write the figures as JSON (rank 0)")


def dry_run_main(args) -> int:
    """``--dry-run``: print this rank's (or every planned rank's) figures; write nothing but ``--json``."""
    import json

    from shear.dryrun import DryRunConfig, dry_run, format_report
    from shear.dryrun.memory import parse_size
    from shear.pipeline import is_main_process

    if args.gpus is not None and args.gpus < 0:
        raise ValueError("--gpus: must be >= 0")
    recipe = load_run_recipe(args)  # --smoke: plan the shrunk run
    opts = DryRunConfig(gpus=args.gpus, gpu_mem=parse_size(args.gpu_mem) if args.gpu_mem else None,
                        config_json=args.config_json, accelerate_config=args.accelerate_config,
                        recipe_path=args.recipe)
    result = dry_run(recipe, opts)
    launched = len(result["ranks"]) == 1 and result["launch"]["processes"] > 1
    print(format_report(result, prefix=f"[rank {result['ranks'][0]['rank']}] " if launched else ""))
    if args.json and is_main_process():
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _cmd_run(args) -> int:
    if args.dry_run:
        return dry_run_main(args)
    recipe = load_run_recipe(args)
    summary = run_interruptible(recipe, args)
    if isinstance(summary, int):
        return summary
    print(f"done in {summary['wall_s']} s; stages: {', '.join(summary['stages']) or 'none'}; "
          f"outputs in {summary['output_dir']}")
    if "model_dir" in summary:
        print(f"model: {summary['model_dir']}")
    return 0


def _cmd_quickstart(args) -> int:
    from shear.quickstart import quickstart

    quickstart(out_dir=args.output_dir, rebuild=args.rebuild)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run every stage a recipe names")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
    p.add_argument("-o", "--output-dir", default=None, help="override the recipe's output_dir")
    add_run_flags(p)
    add_dry_run_flags(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("recipes", help="list the shipped recipes with their purpose")
    p.add_argument("--dir", default=None, help="recipes directory (default: the shipped one)")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("quickstart", help="build a small model, prune it, recover it, compare (offline, < 10 min)")
    p.add_argument("-o", "--output-dir", default="shear-quickstart", help="where the run's outputs go")
    p.add_argument("--rebuild", action="store_true", help="retrain the quick reference model even if cached")
    p.set_defaults(func=_cmd_quickstart)
