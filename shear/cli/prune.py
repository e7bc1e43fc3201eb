"""``shear prune RECIPE_OR_MODEL_DIR``: analyze -> score -> plan -> slice -> export, with a report.

    shear prune recipes/prune/flap.yaml prune.target.ratio=0.35 -o runs/p35
    shear prune ~/.cache/shear/models/reference --ratio 0.35 --estimator flap --structures mlp hidden -o runs/p35

``--experts R`` removes whole experts of mixture-of-experts models instead, ``--expert-channels R`` every
expert's intermediate channels (shear/cli/prune_experts.py).
A recipe supplies the model, ``importance`` and ``prune`` sections (dotted overrides apply); a model
directory (or 'reference' / 'reference-quick') takes the flags instead. Outputs: OUT/report.json,
OUT/plans.json, OUT/kept_widths.png and the pruned model in OUT/model, written in the checkpoint's dtype
(``--dtype``; scoring and slicing run in fp32) and sharded at ``--max-shard-size``, beside OUT and moved in
once the whole command has succeeded (an OUT that holds a finished prune is replaced only with
--overwrite, said before any work). The calibration text, sample count and tokenizer class are
printed and kept in the report (``calibration_text``).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _configs_from_flags(args):
    from shear.prune.config import ImportanceConfig, PruneConfig

    target = {"ratio": args.ratio} if args.params is None else {"params": args.params}
    vocab = {"source": args.vocab_text, "min_count": args.vocab_min_count} if args.vocab_text else None
    prune = PruneConfig(target=target, structures=args.structures, allocation=args.allocation, heads=args.heads,
                        round_to=args.round_to, iterative_steps=args.steps, vocab=vocab,
                        protected_layers=[int(x) for x in args.protect] if args.protect else [])
    imp = ImportanceConfig(estimator=args.estimator, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                           source=args.calib, device=args.device)
    return prune, imp


def _flags_recipe(args, prune, imp) -> dict:
    """The recipe a prune from a model directory's flags records beside its export."""
    return {"model": {"path": args.source}, "importance": imp.model_dump(mode="json"),
            "prune": prune.model_dump(mode="json")}


def _refuse_finished(out: Path, overwrite: bool) -> None:
    """A finished prune in ``out`` (its report, or a model) is replaced only with --overwrite: said before any work."""
    done = [n for n in ("report.json", "model") if (out / n / "config.json" if n == "model" else out / n).exists()]
    if done and not overwrite:
        raise FileExistsError(f"{out} already holds a finished prune ({', '.join(done)}); pass --overwrite to "
                              "replace it, or -o elsewhere")


def _cmd_prune(args) -> int:
    from shear.rundir import locked
    from shear.storage import MAX_SHARD_SIZE

    if args.no_export and (args.dtype != "auto" or args.max_shard_size != MAX_SHARD_SIZE):
        raise ValueError("--dtype / --max-shard-size: nothing is written with --no-export; drop them")
    src = Path(args.source)
    recipe = None
    if args.experts is not None or args.expert_channels is not None:
        from shear.cli import prune_experts

        prune_experts.check_flags(args, src.suffix in (".yaml", ".yml"))
        out = Path(args.output_dir or "shear-prune")
        with locked(out):
            _refuse_finished(out, args.overwrite)
            report = prune_experts.prune_experts_into(args, out)
        prune_experts.print_summary(report, out)
        return 0
    if args.expert_criterion != "reconstruction":
        raise ValueError("--expert-criterion: only with --experts")
    if args.expert_channel_criterion != "wanda" or args.keep_shared_expert or args.no_routing_weight:
        raise ValueError("--expert-channel-criterion / --keep-shared-expert / --no-routing-weight: only with "
                         "--expert-channels")
    if args.stream:
        if src.suffix in (".yaml", ".yml"):
            raise ValueError("--stream prunes a model directory (with the flags); a recipe's model is built in memory")
        out = Path(args.output_dir or "shear-prune")
        with locked(out):
            _refuse_finished(out, args.overwrite)
            report = _streamed_into(args, out)
        _print_summary(args, report, out)
        return 0
    if src.suffix in (".yaml", ".yml"):
        from shear.cli.run import recipe_overrides
        from shear.config import load_recipe

        recipe = load_recipe(src, recipe_overrides(args))
        if recipe.prune is None:
            raise ValueError(f"recipe {src}: no prune section")
        if recipe.prune.learn is not None or recipe.prune.tune_rounds > 1:
            raise ValueError(f"recipe {src}: prune.learn / prune.tune_rounds prune while training; use `shear run`")
        out = Path(args.output_dir or Path(recipe.output_dir) / "prune")
    else:
        if args.overrides:
            raise ValueError("key=value overrides need a recipe; with a model directory use the flags")
        out = Path(args.output_dir or "shear-prune")
    with locked(out):  # one command per directory
        _refuse_finished(out, args.overwrite)
        report = _prune_into(args, recipe, out)
    _print_summary(args, report, out)
    return 0


def _print_summary(args, report: dict, out: Path) -> None:
    if report.get("vocab"):
        v = report["vocab"]
        print(f"vocabulary: {v['tokens_before']:,} -> {v['tokens_after']:,} tokens (text: {v['source']})")
    if report["calibration_text"]:
        print(f"calibration: {report['calibration_text']}")
    print(f"params {report['params_before']:,} -> {report['params_after']:,} "
          f"({100 * report['removed_ratio']:.1f}% removed); MACs x{report['mac_ratio']:.3f}; "
          f"{report['time_s']['total']:.1f} s; peak RSS {report['vm_hwm_mb']:.0f} MB; report in {out}")
    if not args.no_export:
        src_mb = f" (source {report['source_weight_bytes'] / 2**20:.2f} MB)" if report["source_weight_bytes"] else ""
        print(f"model: {report['model_bytes']['weights'] / 2**20:.2f} MB of {report['dtype']['written']} weights "
              f"on disk{src_mb} in {out / 'model'}")


def _streamed_into(args, out: Path) -> dict:
    """``--stream``: score and slice one block at a time from the shards (``shear.prune.stream``), written into
    a staging directory beside ``out`` and moved in once all succeeded."""
    import shutil

    from shear.models import checkpoint_dtype, export_dtype, load_dtype, load_tokenizer, resolve_model_path
    from shear.prune.export import _check_target, remove_stale_staging, staging_dir
    from shear.prune.stream import check_streamable, prune_streamed

    prune, imp = _configs_from_flags(args)
    check_streamable(prune, imp)  # before any work
    path = resolve_model_path(args.source)
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"prune --stream reads a local directory's safetensors shards; {args.source} is not one")
    if not args.no_export:
        _check_target(None, (out / "model").expanduser().resolve(), args.overwrite, (path,))
    ckpt = checkpoint_dtype(path)
    written = export_dtype(args.dtype, path)
    compute = load_dtype(written, ckpt, imp.device)
    remove_stale_staging(out)
    stage = staging_dir(out.expanduser().resolve())
    recipe = _flags_recipe(args, prune, imp)
    try:
        report = prune_streamed(path, load_tokenizer(path, args.trust_remote_code), prune, imp, out_dir=stage,
                                export_dir=None if args.no_export else stage / "model", recipe=recipe,
                                written=written, compute=compute, max_shard_size=args.max_shard_size,
                                trust_remote_code=args.trust_remote_code)
        _publish(args, stage, out, report, {"checkpoint": ckpt, "loaded": compute}, written, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _prune_into(args, recipe, out: Path) -> dict:
    """Load, prune and export into a staging directory beside ``out``; move it in once all succeeded."""
    import shutil

    from shear.memory import trim
    from shear.models import SHORT, checkpoint_dtype, export_dtype, load_dtype, warn_if_too_big
    from shear.prune.export import _check_target, remove_stale_staging, staging_dir
    from shear.prune.pipeline import prune_with_vocab

    if recipe is not None:
        from shear.pipeline import build_model

        model, tok = build_model(recipe)
        source = recipe.model.path if recipe.model.init == "pretrained" else None
        written = export_dtype(args.dtype, source, model)
        prune, imp = recipe.prune, recipe.importance
        recipe_dict = recipe.model_dump(mode="json")
    else:
        from shear.models import load_pretrained

        source = args.source
        written = export_dtype(args.dtype, source)
        warn_if_too_big(source, "prune", "--stream")
        model, tok = load_pretrained(source, dtype=load_dtype(written, checkpoint_dtype(source)),
                                     trust_remote_code=args.trust_remote_code, finite=True)
        prune, imp = _configs_from_flags(args)
        recipe_dict = _flags_recipe(args, prune, imp)
    ckpt, loaded = checkpoint_dtype(source) if source else None, SHORT.get(next(model.parameters()).dtype)
    if not args.no_export:  # before any work: the model's own directory, or a model shear did not write
        _check_target(model, (out / "model").expanduser().resolve(), args.overwrite, ())
    remove_stale_staging(out)
    stage = staging_dir(out.expanduser().resolve())  # nothing is written into OUT until the whole command succeeded
    try:
        _, _, report = prune_with_vocab(model, tok, prune, imp, out_dir=stage, recipe=recipe_dict,
                                        export_dir=None if args.no_export else stage / "model",
                                        data=recipe.data if recipe is not None else None,
                                        export_dtype=written, max_shard_size=args.max_shard_size)
        del model
        trim()
        _publish(args, stage, out, report, {"checkpoint": ckpt, "loaded": loaded}, written, source)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _publish(args, stage: Path, out: Path, report: dict, dtype: dict, written: str, source: str | None) -> None:
    """The report's dtypes, peak RSS and bytes on disk, then the staged prune moved into ``out``."""
    from shear.memory import peak_rss_mb
    from shear.models import source_weight_bytes
    from shear.prune.export import publish_prune
    from shear.sparse.export import bytes_on_disk

    report["dtype"] = dict(dtype, written=None if args.no_export else written)
    report["vm_hwm_mb"] = peak_rss_mb()
    report["source_weight_bytes"] = source_weight_bytes(source) if source else None
    if not args.no_export:
        report["model_bytes"] = bytes_on_disk(stage / "model")
    publish_prune(stage, out, report)


def register(sub: argparse._SubParsersAction) -> None:
    from shear.storage import EXPORT_DTYPES, MAX_SHARD_SIZE, shard_size

    p = sub.add_parser("prune", help="prune a model (recipe or model directory) and export it with a report")
    p.add_argument("source", help="recipe YAML, model directory, or 'reference' / 'reference-quick'")
    p.add_argument("overrides", nargs="*", help="recipe only: dotted key=value overrides, e.g. prune.target.ratio=0.5")
    p.add_argument("-o", "--output-dir", default=None, help="output directory (default: OUTPUT_DIR/prune or ./shear-prune)")
    p.add_argument("--no-export", action="store_true", help="write the report only")
    p.add_argument("--dtype", default="auto", choices=EXPORT_DTYPES,
                   help="dtype of the written weights (default auto: the checkpoint's, from its safetensors "
                        "headers or config.json); scoring and slicing run in fp32")
    p.add_argument("--max-shard-size", type=shard_size, default=MAX_SHARD_SIZE,
                   help=f"largest weights file of the export (default {MAX_SHARD_SIZE}; bigger models are split "
                        "into shards with model.safetensors.index.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shear's earlier prune in OUT (report, plans, plot and model); nothing else there")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped in a model directory (per-layer pruned exports carry auto_map)")
    g = p.add_argument_group("model directory flags (ignored with a recipe)")
    g.add_argument("--ratio", type=float, default=0.35, help="fraction of parameters to remove")
    g.add_argument("--params", type=int, default=None, help="parameter budget (instead of --ratio)")
    g.add_argument("--estimator", default="obs", help="importance estimator name (default obs; flap is ~4x faster)")
    g.add_argument("--structures", nargs="+", default=["heads", "mlp"], help="heads mlp hidden layers")
    g.add_argument("--allocation", default="balanced", choices=["balanced", "uniform", "global", "pool"],
                   help="balanced (default): same widths in every layer, heads/MLP split by scores")
    g.add_argument("--heads", default="kv_group", choices=["kv_group", "query_head"],
                   help="GQA: remove whole KV groups (default) or query heads inside every group")
    g.add_argument("--round-to", type=int, default=1)
    g.add_argument("--steps", type=int, default=1, help="iterative steps")
    g.add_argument("--stream", action="store_true",
                   help="hold one decoder block at a time, read from the safetensors shards and written into new "
                        "ones (models larger than memory): heads and MLP channels, estimators "
                        "obs (refitted block by block)/flap/flap_original/wanda_sp/minitron/magnitude_l1/"
                        "magnitude_l2/random")
    g.add_argument("--protect", nargs="*", default=None, help="protected layer indices")
    g.add_argument("--n-samples", type=int, default=None, help="calibration sequences (default 128; 32 on the "
                                                               "reference models' Shakespeare corpus)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512, capped at "
                                                            "the model's positions; 128 on the reference models' corpus)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="score and slice on this device (cpu, cuda, cuda:N; auto: this "
                                                  "rank's GPU when there is one); with --stream the blocks go there "
                                                  "one at a time")
    g.add_argument("--vocab-text", default=None, help="trim the vocabulary first (WordPiece encoders) to the tokens this "
                                                       "text uses: a file, a directory, an HF dataset name or 'shakespeare' "
                                                       "(prune.vocab.source); --ratio still counts from the untrimmed model")
    g.add_argument("--vocab-min-count", type=int, default=1, help="with --vocab-text: uses a token needs to stay")
    g.add_argument("--calib", default=None, help="calibration text (importance.source): a text file, a directory, "
                   "an HF dataset name, 'english' or 'shakespeare' (default: the text shear trained the "
                   "model on, else general English prose: 'english')")
    e = p.add_argument_group("mixture of experts (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE; instead of width pruning)")
    e.add_argument("--experts", type=float, default=None, metavar="R",
                   help="remove floor(R * E) experts in every sparse layer (0 < R < 1); the export stays the "
                        "stock class")
    e.add_argument("--expert-criterion", default="reconstruction",
                   choices=["frequency", "weighted", "reconstruction", "random"],
                   help="expert importance: top-k frequency; x mean routing weight x mean output norm; "
                        "the block's output error when the expert alone is dropped (default); seeded random")
    e.add_argument("--expert-channels", type=float, default=None, metavar="R",
                   help="remove floor(R * I) intermediate channels of every routed expert (each its own, scored on "
                        "the calibration tokens routed to it) and of Qwen2-MoE's shared expert (0 < R < 1); the "
                        "export stays the stock class; combines with --experts (experts first)")
    e.add_argument("--expert-channel-criterion", default="wanda", choices=["wanda", "flap", "magnitude", "random"],
                   help="channel importance on the expert's down-projection input: Wanda-sp (default); FLAP "
                        "fluctuation; weight norms only; seeded random")
    e.add_argument("--keep-shared-expert", action="store_true",
                   help="leave Qwen2-MoE's shared expert whole (default: its channels go at the same ratio)")
    e.add_argument("--no-routing-weight", action="store_true",
                   help="channel statistics of the raw activations (default: scaled by each token's routing weight)")
    p.set_defaults(func=_cmd_prune)
