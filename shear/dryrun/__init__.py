"""Dry run of a recipe (``shear run RECIPE --dry-run``): per-rank memory, calibration cost and the pruned
size, from configs on the meta device; nothing is trained, loaded or written.

    from shear.dryrun import DryRunConfig, dry_run, format_report
    print(format_report(dry_run(recipe, DryRunConfig(gpus=8, gpu_mem=80 * 10**9))))

``memory`` holds the arithmetic (pure functions), ``launch`` reads where the run would train, ``model``
builds the meta models, ``estimate`` puts them together, ``report`` prints.
"""
from shear.dryrun.estimate import DryRunConfig, dry_run
from shear.dryrun.report import format_report

__all__ = ["DryRunConfig", "dry_run", "format_report"]
