"""``shear prune MODEL_DIR --experts R`` / ``--expert-channels R``: remove a fraction R of every sparse layer's
experts, or of every expert's intermediate channels, or both (mixture of experts).

    shear prune ./Qwen3-30B-A3B --experts 0.25 --expert-criterion reconstruction -o runs/experts25
    shear prune ./Qwen1.5-MoE-A2.7B --expert-channels 0.25 --expert-channel-criterion wanda -o runs/channels25

Scores from calibration (``--calib``, ``--n-samples``, ``--seq-len``, ``--seed`` as for width pruning), the
same count kept in every layer (and expert), the stock class exported (OUT/model) with OUT/report.json. Both
flags together: the experts go first, then the channels of those that stay, scored on the same calibration
sequences in a second pass over the smaller model. Staged and published as width pruning is
(``--overwrite``, ``--dtype``, ``--max-shard-size``). The width flags do not combine with it.
"""
from __future__ import annotations

from pathlib import Path

#: width-pruning flags that --experts does not take, with their defaults (a changed one is refused)
_WIDTH_FLAGS = {"ratio": 0.35, "params": None, "estimator": "obs", "structures": ["heads", "mlp"],
                "allocation": "balanced", "heads": "kv_group", "round_to": 1, "steps": 1, "protect": None,
                "vocab_text": None}


def check_flags(args, recipe: bool) -> None:
    """Refuse what ``--experts`` / ``--expert-channels`` cannot honour: a recipe, width-pruning flags, or the
    other mode's options without it (never ignored quietly)."""
    flag = "--experts" if args.experts is not None else "--expert-channels"
    if recipe:
        raise ValueError(f"{flag} takes a model directory, not a recipe")
    if args.stream:
        raise ValueError(f"--stream: {flag} loads the model whole")
    if args.experts is None and args.expert_criterion != "reconstruction":
        raise ValueError("--expert-criterion: only with --experts")
    if args.expert_channels is None and (args.expert_channel_criterion != "wanda" or args.keep_shared_expert
                                         or args.no_routing_weight):
        raise ValueError("--expert-channel-criterion / --keep-shared-expert / --no-routing-weight: only with "
                         "--expert-channels")
    changed = [k for k, v in _WIDTH_FLAGS.items() if getattr(args, k) != v]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"{flags}: width pruning does not combine with {flag}; prune experts first, then "
                         "prune the exported model's widths")


def prune_experts_into(args, out: Path) -> dict:
    """Load, remove experts and/or expert channels and export into a staging directory beside ``out``; moved in
    once all succeeded."""
    import shutil
    import time

    from shear.prune.export import publish_prune
    from shear.memory import peak_rss_mb
    from shear.models import SHORT, checkpoint_dtype, export_dtype, load_dtype, load_pretrained, source_weight_bytes
    from shear.prune.expert_channels import ExpertChannelConfig
    from shear.prune.experts import ExpertPruneConfig
    from shear.prune.export import _check_target, export, remove_stale_staging, staging_dir
    from shear.sparse.export import bytes_on_disk

    t0 = time.perf_counter()
    calib = dict(source=args.calib, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
    cfg = None if args.experts is None else ExpertPruneConfig(ratio=args.experts, criterion=args.expert_criterion,
                                                              **calib)
    ccfg = None if args.expert_channels is None else ExpertChannelConfig(
        ratio=args.expert_channels, criterion=args.expert_channel_criterion, routing_weight=not args.no_routing_weight,
        shared="keep" if args.keep_shared_expert else "prune", **calib)
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
    recipe = {"model": {"path": source}}
    for key, c in (("experts", cfg), ("expert_channels", ccfg)):
        if c is not None:
            recipe[key] = c.model_dump(mode="json")
    try:
        stage.mkdir(parents=True)
        report = prune_moe_(model, tok, cfg, ccfg)
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


def prune_moe_(model, tok, cfg, ccfg) -> dict:
    """Experts (``cfg``), then expert channels (``ccfg``), either None; one calibration sample for both. The
    report of the one that ran, or ``{"mode": "experts+expert_channels", "experts": ..., "expert_channels": ...}``."""
    from shear.prune.expert_channels import prune_expert_channels_
    from shear.prune.experts import prune_experts_

    if cfg is None:
        return prune_expert_channels_(model, tok, ccfg)
    if ccfg is None:
        return prune_experts_(model, tok, cfg)
    ids, line = None, None
    if cfg.criterion != "random" or ccfg.criterion not in ("random", "magnitude"):
        from shear.data.calibration import calibration_for

        ids, line = calibration_for(model, tok, cfg.source, None, cfg.n_samples, cfg.seq_len, cfg.seed,
                                    key="experts.source")
    rep_e = prune_experts_(model, tok, cfg, ids=ids)
    rep_c = prune_expert_channels_(model, tok, ccfg, ids=ids)
    for r in (rep_e, rep_c):
        r["calibration_text"] = line
    return {"mode": "experts+expert_channels", "calibration_text": line, "params_before": rep_e["params_before"],
            "params_after": rep_c["params_after"], "removed_ratio": 1 - rep_c["params_after"] / rep_e["params_before"],
            "experts": rep_e, "expert_channels": rep_c,
            "time_s": {"score": rep_e["time_s"]["score"] + rep_c["time_s"]["score"]}}


def print_summary(report: dict, out: Path) -> None:
    if report["calibration_text"]:
        print(f"calibration: {report['calibration_text']}")
    parts = []
    e = report.get("experts", report) if report["mode"] != "expert_channels" else None
    c = report.get("expert_channels", report) if report["mode"] != "experts" else None
    if e is not None:
        parts.append(f"experts {e['experts_before']} -> {e['experts_after']} per sparse layer ({e['criterion']})")
    if c is not None:
        sh = c["shared_expert"]
        parts.append(f"channels {c['channels_before']} -> {c['channels_after']} per expert ({c['criterion']}"
                     f"{', routing-weighted' if c['routing_weight'] and c['criterion'] in ('wanda', 'flap') else ''})"
                     + ("" if sh is None else f", shared expert {sh['channels_before']} -> {sh['channels_after']}")
                     + (f", {c['fallback_experts']} expert(s) without calibration tokens scored by weight magnitude"
                        if c["fallback_experts"] else ""))
    print(f"{'; '.join(parts)}; params {report['params_before']:,} -> {report['params_after']:,} "
          f"({100 * report['removed_ratio']:.1f}% removed); {report['time_s']['total']:.1f} s; report in {out}")
    if "model_bytes" in report:
        print(f"model: {report['model_bytes']['weights'] / 2**20:.2f} MB of {report['dtype']['written']} weights "
              f"on disk in {out / 'model'}")
