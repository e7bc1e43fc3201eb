"""``shear prune MODEL_DIR --experts R``: remove a fraction R of every sparse layer's experts (mixture of experts).

    shear prune ./Qwen3-30B-A3B --experts 0.25 --expert-criterion reconstruction -o runs/experts25

Scores the experts from one calibration pass (``--calib``, ``--n-samples``, ``--seq-len``, ``--seed`` as for
width pruning), keeps the same count in every layer and exports the stock class (OUT/model) with
OUT/report.json: per layer the kept and removed experts and every expert's score. Staged and published as
width pruning is (``--overwrite``, ``--dtype``, ``--max-shard-size``). The width flags do not combine with it.
"""
from __future__ import annotations

from pathlib import Path

#: width-pruning flags that --experts does not take, with their defaults (a changed one is refused)
_WIDTH_FLAGS = {"ratio": 0.35, "params": None, "estimator": "obs", "structures": ["heads", "mlp"],
                "allocation": "balanced", "heads": "kv_group", "round_to": 1, "steps": 1, "protect": None,
                "vocab_text": None}


def check_flags(args, recipe: bool) -> None:
    """Refuse what ``--experts`` cannot honour: a recipe, or width-pruning flags (never ignored quietly)."""
    if recipe:
        raise ValueError("--experts takes a model directory, not a recipe")
    changed = [k for k, v in _WIDTH_FLAGS.items() if getattr(args, k) != v]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"{flags}: width pruning does not combine with --experts; prune experts first, then "
                         "prune the exported model's widths")


def prune_experts_into(args, out: Path) -> dict:
    """Load, remove experts and export into a staging directory beside ``out``; moved in once all succeeded."""
    import shutil
    import time

    from shear.prune.export import publish_prune
    from shear.memory import peak_rss_mb
    from shear.models import SHORT, checkpoint_dtype, export_dtype, load_dtype, load_pretrained, source_weight_bytes
    from shear.prune.experts import ExpertPruneConfig, prune_experts_
    from shear.prune.export import _check_target, export, remove_stale_staging, staging_dir
    from shear.sparse.export import bytes_on_disk

    t0 = time.perf_counter()
    cfg = ExpertPruneConfig(ratio=args.experts, criterion=args.expert_criterion, source=args.calib,
                            n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
    source = args.source
    written = export_dtype(args.dtype, source)
    ckpt = checkpoint_dtype(source)
    model, tok = load_pretrained(source, dtype=load_dtype(written, ckpt), trust_remote_code=args.trust_remote_code,
                                 finite=True)
    loaded = SHORT.get(next(model.parameters()).dtype)
    if not args.no_export:
        _check_target(model, (out / "model").expanduser().resolve(), args.overwrite, ())
    remove_stale_staging(out)
    stage = staging_dir(out.expanduser().resolve())
    recipe = {"model": {"path": source}, "experts": cfg.model_dump(mode="json")}
    try:
        stage.mkdir(parents=True)
        report = prune_experts_(model, tok, cfg)
        if not args.no_export:
            export(model, stage / "model", tok, recipe, dtype=written, max_shard_size=args.max_shard_size)
            report["model_dir"] = str(stage / "model")
            report["model_bytes"] = bytes_on_disk(stage / "model")
        report["recipe"] = recipe
        report["dtype"] = {"checkpoint": ckpt, "loaded": loaded, "written": None if args.no_export else written}
        report["source_weight_bytes"] = source_weight_bytes(source)
        report["time_s"]["total"] = time.perf_counter() - t0
        report["vm_hwm_mb"] = peak_rss_mb()
        publish_prune(stage, out, report)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def print_summary(report: dict, out: Path) -> None:
    if report["calibration_text"]:
        print(f"calibration: {report['calibration_text']}")
    print(f"experts {report['experts_before']} -> {report['experts_after']} per sparse layer "
          f"({report['criterion']}); params {report['params_before']:,} -> {report['params_after']:,} "
          f"({100 * report['removed_ratio']:.1f}% removed); {report['time_s']['total']:.1f} s; report in {out}")
    if "model_bytes" in report:
        print(f"model: {report['model_bytes']['weights'] / 2**20:.2f} MB of {report['dtype']['written']} weights "
              f"on disk in {out / 'model'}")
