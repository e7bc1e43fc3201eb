"""``shear sparsify MODEL``: zero single weights (unstructured or N:M), then write both export forms.

    shear sparsify reference-quick --method sparsegpt --sparsity 0.5 --n-samples 32 --seq-len 128 -o runs/sgpt50
    shear sparsify ~/models/llama --method wanda --pattern 2:4 -o runs/wanda24
    shear sparsify ~/models/llama-8b --method sparsegpt --sparsity 0.5 --stream --no-compressed -o runs/sgpt50

Outputs: OUT/model (dense safetensors with the zeros; plain ``from_pretrained`` loads it),
OUT/compressed (compressed-tensors: sparse-bitmask, or sparse-24-bitmask for 2:4) and OUT/report.json
(the per-layer plan, bytes on disk of each form, times). Both forms are written in the checkpoint's dtype
(``--dtype``; SparseGPT's updates and the statistics are fp32) and sharded at ``--max-shard-size``. In a
recipe the same stage is ``sparsify:``. ``--stream`` holds one block at a time (``shear.sparse.stream``): a
checkpoint larger than memory, the dense form only.
"""
from __future__ import annotations

import argparse
from pathlib import Path


CALIBRATION_FLAGS = (("source", "--source"), ("n_samples", "--n-samples"), ("seq_len", "--seq-len"))


def _refuse_unused_calibration(args) -> None:
    """magnitude with uniform allocation reads no text: a calibration flag given with it is an error."""
    if args.method == "magnitude" and args.allocation == "uniform":
        for key, flag in CALIBRATION_FLAGS:
            if getattr(args, key) is not None:
                raise ValueError(f"{flag}: magnitude uses no calibration text; drop {flag}")


def _cmd_sparsify(args) -> int:
    from shear.rundir import locked
    from shear.sparse.config import SparsifyConfig

    _refuse_unused_calibration(args)
    n_samples = {} if args.n_samples is None else {"n_samples": args.n_samples}
    cfg = SparsifyConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, allocation=args.allocation,
                         owl_m=args.owl_m, owl_lambda=args.owl_lambda, targets=args.targets, **n_samples,
                         seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, source=args.source,
                         blocksize=args.blocksize, dampening=args.dampening, device=args.device,
                         compressed=not args.no_compressed)
    out = Path(args.output_dir)
    with locked(out):  # one command per directory
        report, rec = _sparsify_into(args, cfg, out)
    written, source_bytes = report["dtype"]["written"], report["source_weight_bytes"]
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    forms = [f"dense {mb(rec['model']['bytes']['weights'])}"]
    if "compressed" in rec:
        forms.append(f"{rec['compressed']['format']} {mb(rec['compressed']['bytes']['weights'])}")
    original = f"original {mb(source_bytes)}" if source_bytes else f"original in memory {mb(report['dense_weight_bytes'])}"
    print(f"{report['method']} {report['pattern'] or report['sparsity']}: {100 * report['pruned_sparsity']:.1f}% of "
          f"{len(report['pruned'])} linears zero ({100 * report['model_sparsity']:.1f}% of all weights); {written} weights "
          f"on disk: {', '.join(forms)} ({original}); {report['time_s']['total']:.1f} s; peak RSS "
          f"{report['vm_hwm_mb']:.0f} MB; report in {out / 'report.json'}")
    return 0


def _sparsify_into(args, cfg, out: Path) -> tuple[dict, dict]:
    """Sparsify and publish both forms and the report into ``out``: (report, export record)."""
    from shear.memory import trim
    from shear.models import (SHORT, checkpoint_dtype, export_dtype, load_dtype, load_pretrained, source_weight_bytes,
                              warn_if_too_big)
    from shear.prune.export import remove_stale_staging
    from shear.sparse.pipeline import export_sparse, run_sparsify

    if args.stream:
        from shear.sparse.stream import check_streamable

        check_streamable(cfg)  # before any work
    taken = [d for d in ("model", "compressed") if (out / d / "config.json").exists()]
    if taken and not args.overwrite:  # before any work (the export would refuse it at the end)
        raise FileExistsError(f"{out / taken[0]} already holds a model (--overwrite replaces shear's earlier export)")
    remove_stale_staging(out)
    ckpt = checkpoint_dtype(args.model)
    written = export_dtype(args.dtype, args.model)
    if args.stream:
        return _streamed_into(args, cfg, out, load_dtype(written, ckpt, args.device), written)
    warn_if_too_big(args.model, "sparsify", "--stream --no-compressed")
    model, tok = load_pretrained(args.model, dtype=load_dtype(written, ckpt, args.device),
                                 trust_remote_code=args.trust_remote_code, finite=True)
    loaded = SHORT.get(next(model.parameters()).dtype)
    model, report = run_sparsify(model, tok, cfg)
    report["dtype"] = {"checkpoint": ckpt, "loaded": loaded, "written": written}
    report["source_weight_bytes"] = source_weight_bytes(args.model)
    recipe = {"model": {"path": args.model}, "sparsify": cfg.model_dump(mode="json")}
    rec = export_sparse(model, report, cfg, out / "model", out / "compressed" if cfg.compressed else None,
                        tokenizer=tok, recipe=recipe, overwrite=args.overwrite, dtype=written,
                        max_shard_size=args.max_shard_size, report_dir=out,
                        drop=() if cfg.compressed else (out / "compressed",))  # not the old run's beside the new
    del model
    trim()
    return report, rec


def _streamed_into(args, cfg, out: Path, loaded: str, written: str) -> tuple[dict, dict]:
    """``--stream``: one block at a time from the shards (``shear.sparse.stream``), the dense form only."""
    from shear.models import load_tokenizer, resolve_model_path
    from shear.sparse.stream import run_sparsify_streamed

    path = resolve_model_path(args.model)
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"sparsify --stream reads a local directory's safetensors shards; {args.model} is not one")
    recipe = {"model": {"path": args.model}, "sparsify": cfg.model_dump(mode="json")}
    report = run_sparsify_streamed(path, load_tokenizer(path, args.trust_remote_code), cfg, out / "model",
                                   written=written, compute=loaded, recipe=recipe, overwrite=args.overwrite,
                                   max_shard_size=args.max_shard_size, trust_remote_code=args.trust_remote_code,
                                   report_dir=out, drop=(out / "compressed",))
    return report, report["export"]


def register(sub: argparse._SubParsersAction) -> None:
    from shear.storage import EXPORT_DTYPES, MAX_SHARD_SIZE, shard_size

    p = sub.add_parser("sparsify", help="zero single weights (magnitude / Wanda / SparseGPT, unstructured or N:M) "
                                        "and export dense + compressed-tensors forms with a report")
    p.add_argument("model", help="model directory, hub name, or 'reference' / 'reference-quick'")
    p.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sparsity", type=float, help="fraction of each pruned linear's weights set to zero")
    g.add_argument("--pattern", help="N:M, e.g. 2:4 or 4:8")
    p.add_argument("-o", "--output-dir", required=True, help="OUT: model/, compressed/ and report.json go here")
    p.add_argument("--n-samples", type=int, default=None, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per calibration sequence (default: the model's max_position_embeddings, at most 4096)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl"], help="per-layer sparsity (owl: unstructured only)")
    p.add_argument("--owl-m", type=float, default=5.0, help="owl: outlier threshold, x the layer's mean score")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl: largest deviation of a layer from the target")
    p.add_argument("--targets", nargs="+", default=None,
                   help="linears to prune: names (end of the module path) or re:REGEX; default every linear in the blocks")
    p.add_argument("--source", default=None, help="calibration text (default: the shipped corpus)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt: columns per lazy-update block")
    p.add_argument("--dampening", type=float, default=0.01, help="sparsegpt: fraction of mean(diag H) added to the diagonal")
    p.add_argument("--device", default=None, help="calibrate and prune on this device (e.g. cuda)")
    p.add_argument("--no-compressed", action="store_true", help="write OUT/model only")
    p.add_argument("--dtype", default="auto", choices=EXPORT_DTYPES,
                   help="dtype of the written weights, both forms (default auto: the checkpoint's, from its "
                        "safetensors headers or config.json); loaded in it only with --device cuda, else fp32")
    p.add_argument("--max-shard-size", type=shard_size, default=MAX_SHARD_SIZE,
                   help=f"largest weights file of each form (default {MAX_SHARD_SIZE}; bigger models are split "
                        "into shards with model.safetensors.index.json)")
    p.add_argument("--overwrite", action="store_true", help="replace shear's earlier export in OUT")
    p.add_argument("--trust-remote-code", action="store_true", help="run modeling code shipped in the model directory")
    p.add_argument("--stream", action="store_true",
                   help="read, prune and write one block at a time from the safetensors shards (peak memory: one "
                        "block + the calibration activations, whatever the depth); dense form only (with "
                        "--no-compressed), uniform allocation")
    p.set_defaults(func=_cmd_sparsify)
