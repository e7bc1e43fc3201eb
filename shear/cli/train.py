"""``shear train RECIPE [key=value ...]``: run a recipe whose train section does the work
(recovery of a pruned student with KD, fine-tuning, or pretraining). Also runnable as
``accelerate launch --config_file recipes/accelerate/ddp.yaml -m shear train RECIPE``."""
from __future__ import annotations

import argparse


def _cmd_train(args) -> int:
    from shear.cli.run import dry_run_main, load_run_recipe, run_interruptible

    if args.dry_run:
        return dry_run_main(args)
    recipe = load_run_recipe(args)
    if recipe.train is None:
        raise ValueError(f"{args.recipe}: recipe.train: required by `shear train` (use `shear run` for recipes without training)")
    summary = run_interruptible(recipe, args)
    if isinstance(summary, int):
        return summary
    tr = summary.get("train", {})
    if tr.get("final_val_ppl") is not None:
        print(f"validation PPL after training: {tr['final_val_ppl']:.2f} "
              f"({tr.get('steps')} steps, {tr.get('tokens_per_s') or 0:.0f} tokens/s)")
    print(f"done in {summary['wall_s']} s; outputs in {summary['output_dir']}")
    if "model_dir" in summary:
        print(f"model: {summary['model_dir']}")
    return 0


def register(subparsers) -> None:
    from shear.cli.run import add_dry_run_flags, add_run_flags

    p = subparsers.add_parser(
        "train", help="train / recover a model as a recipe says (LoRA or full, CE and/or KD)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML with a train section (and distill for KD)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10 distill.kd_weight=0.5")
    p.add_argument("-o", "--output-dir", default=None, help="where outputs go (default: the recipe's output_dir)")
    add_run_flags(p)
    add_dry_run_flags(p)
    p.set_defaults(func=_cmd_train)
