"""``run_sparsify``: calibration text -> ``sparsify_`` -> report (and ``export_sparse``: the two forms + bytes).

The report holds the method, the per-layer plan (target and achieved sparsity of every block and
linear), OWL's outlier ratios when allocated, the calibration (size and text), the time of each phase,
peak memory (``vm_hwm_mb``: the process's VmHWM, export included) and, once exported, the dtype and
bytes on disk of each form next to the dense original's weights.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from shear.sparse.config import MAX_DEFAULT_SEQ_LEN, SparsifyConfig
from shear.sparse.sequential import sparsify_
from shear.storage import MAX_SHARD_SIZE

log = logging.getLogger("shear")


def calibration_length(model, cfg: SparsifyConfig) -> int:
    """``cfg.seq_len``, else the model's max_position_embeddings (n_positions for GPT-2) capped at 4096."""
    if cfg.seq_len is not None:
        return cfg.seq_len
    c = model.config
    n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or MAX_DEFAULT_SEQ_LEN
    return min(int(n), MAX_DEFAULT_SEQ_LEN)


def weight_bytes(model) -> int:
    """Bytes of the model's distinct parameter tensors (tied weights once): the dense form's payload."""
    seen, total = set(), 0
    for p in model.parameters():
        key = id(p) if p.is_meta else p.data_ptr()  # a skeleton's parameters have no storage
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def run_sparsify(model, tokenizer, cfg: SparsifyConfig, out_dir: str | Path | None = None,
                 ids: torch.Tensor | None = None, data=None) -> tuple[torch.nn.Module, dict]:
    """Sparsify ``model`` in place; return ``(model, report)`` (also ``out_dir/report.json`` when given).

    ``ids`` overrides the calibration sampler; otherwise ``cfg.n_samples`` windows of
    ``calibration_length`` tokens come from ``cfg.source``, else ``data`` (a recipe's DataConfig), else
    the shipped corpus. With ``cfg.device`` the work happens there and the model moves back.
    """
    from shear.models import resolve_device
    from shear.prune.pipeline import PeakMemory

    t0 = time.time()
    calib, t_calib = None, 0.0
    needs_data = cfg.method != "magnitude" or cfg.allocation == "owl"
    if ids is None and needs_data:
        from shear.data.calibration import calibration_for

        tc = time.time()
        ids, calib = calibration_for(model, tokenizer, cfg.source, data, cfg.n_samples, calibration_length(model, cfg),
                                     cfg.seed, key="sparsify.source")
        t_calib = time.time() - tc
    home, device = None, resolve_device(cfg.device)
    if device is not None:
        home = next(model.parameters()).device
        model.to(device)
    try:
        with PeakMemory() as mem:
            res = sparsify_(model, cfg, ids)
    finally:
        if home is not None:
            model.to(home)
    report = sparsify_report(res, cfg, ids, calib, t_calib, t0, mem, model)
    if out_dir is not None:
        write_report(report, out_dir)
    return model, report


def sparsify_report(res, cfg: SparsifyConfig, ids, calib: str | None, t_calib: float, t0: float, mem, model) -> dict:
    """The report of a sparsify run (``run_sparsify`` and the streamed ``shear.sparse.stream``): ``model`` may
    be a skeleton on the meta device (parameter counts and bytes only are read from it)."""
    from shear.memory import peak_rss_mb

    z = sum(r["zeros"] for layer in res.plan for r in layer["linears"].values())
    n = sum(r["numel"] for layer in res.plan for r in layer["linears"].values())
    total = sum(p.numel() for p in model.parameters())
    report = {
        "method": cfg.method, "sparsity": cfg.sparsity, "pattern": cfg.pattern, "allocation": cfg.allocation,
        "owl": {"m": cfg.owl_m, "lambda": cfg.owl_lambda, "outlier_ratios": res.owl_ratios} if res.owl_ratios else None,
        "pruned": res.pruned, "pruned_sparsity": round(z / max(n, 1), 6), "model_sparsity": round(z / total, 6),
        "params": total, "nonzero_params": total - z, "plan": res.plan,
        "calibration": None if ids is None else list(ids.shape), "calibration_text": calib,
        "time_s": {"calibration": round(t_calib, 3), **res.time_s, "total": round(time.time() - t0, 3)},
        "peak_rss_mb": round(mem.peak / 2**20, 1), "cuda_peak_mb": round(mem.cuda_peak / 2**20, 1),
        "vm_hwm_mb": peak_rss_mb(), "dense_weight_bytes": weight_bytes(model),
    }
    log.info("sparsify: %s %s, %d linears, %.1f%% of their weights zero (%.1f%% of the model) in %.1f s",
             cfg.method, cfg.pattern or f"{cfg.sparsity:.0%}", len(res.pruned), 100 * report["pruned_sparsity"],
             100 * report["model_sparsity"], report["time_s"]["total"])
    return report


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out / "report.json"


def export_sparse(model, report: dict, cfg: SparsifyConfig, model_dir: str | Path, compressed_dir: str | Path | None,
                  tokenizer=None, recipe: dict | None = None, overwrite: bool = False, dtype: str | None = None,
                  max_shard_size: int | str = MAX_SHARD_SIZE, report_dir: str | Path | None = None,
                  drop: tuple = ()) -> dict:
    """Write the dense form (``model_dir``), unless None the compressed form and, with ``report_dir``, the
    report; return and record in ``report["export"]`` their directories, dtype and bytes on disk
    (``weights``: safetensors, ``total``: all files). ``dtype`` (None: as they are) casts the weights in
    place first: both forms store it; weights over ``max_shard_size`` are split into shards.

    Both targets are checked before any work, every form is staged beside its target, and all are
    published in one step (``shear.prune.export.move_in``, which also takes down shear's earlier
    exports in ``drop``): an interrupted export never leaves one run's dense form beside another
    run's compressed form or report.
    """
    import shutil

    from shear.memory import peak_rss_mb
    from shear.models import SHORT, cast_weights_
    from shear.prune.export import _check_target, move_in, stage_export, staging_dir
    from shear.sparse.export import bytes_on_disk, stage_compressed

    t0 = time.time()
    dirs = [Path(d).expanduser().resolve() for d in (model_dir, compressed_dir) if d is not None]
    for d in dirs:
        _check_target(model, d, overwrite, ())
    cast_weights_(model, dtype)
    staged = []
    try:
        staged.append(stage_export(model, dirs[0], tokenizer=tokenizer, recipe=recipe, max_shard_size=max_shard_size))
        rec = {"model": {"dir": str(model_dir), "bytes": bytes_on_disk(staged[0])},
               "dtype": SHORT.get(model.dtype, str(model.dtype))}
        if compressed_dir is not None:
            tmp, info = stage_compressed(model, dirs[1], report["pruned"], cfg.nm, tokenizer=tokenizer, recipe=recipe,
                                         max_shard_size=max_shard_size)
            staged.append(tmp)
            rec["compressed"] = {**info, "bytes": bytes_on_disk(tmp)}
        rec["dense_weight_bytes"] = report["dense_weight_bytes"]
        rec["time_s"] = round(time.time() - t0, 3)
        report["export"] = rec
        report["vm_hwm_mb"] = peak_rss_mb()  # the export included (its forms are staged)
        forms, files = list(zip(staged, dirs)), []
        if report_dir is not None:
            dest = Path(report_dir) / "report.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged.append(staging_dir(dest))
            staged[-1].write_text(json.dumps(report, indent=2, default=str))
            files = [(staged[-1], dest)]
        move_in(forms, files, [Path(d) for d in drop])
    finally:
        for tmp in staged:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()
    return rec
