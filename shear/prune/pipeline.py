"""``run_prune``: calibration text -> the transform (``shear.prune.transform``) -> report, plot, export.

The report holds params and MACs before/after, kept widths per layer (also plotted), the time of
each phase and the peak memory (process RSS, sampled, and ``vm_hwm_mb``: the process's high-water mark
(``VmHWM``), loading and export included; CUDA peak when on GPU).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import torch

from shear.analyze import analyze
from shear.analyze.graph import PrunePlan, StructureGraph
from shear.importance import needs_data
from shear.memory import peak_rss_mb
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.transform import check_settings, kinds_needed, prune_to_target_  # noqa: F401 (kinds_needed re-exported)
from shear.storage import MAX_SHARD_SIZE

log = logging.getLogger("shear")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Context manager sampling RSS every ``interval`` s in a thread; ``.peak`` in bytes."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def layer_widths(graph: StructureGraph) -> dict:
    """``{"heads": [..], "kv_heads": [..], "intermediate": [..], "hidden": d, "layers": n}`` from a graph."""
    n = graph.meta.get("num_layers", 0)
    out = {"heads": [0] * n, "kv_heads": [0] * n, "intermediate": [0] * n}
    for g in graph.groups:
        if g.kind in ("head", "kv_group", "query_head"):
            out["heads"][g.layer], out["kv_heads"][g.layer] = g.meta.get("heads"), g.meta.get("kv_heads")
        elif g.kind == "mlp_channel":
            out["intermediate"][g.layer] = g.num_units
    hidden = [g for g in graph.groups if g.kind == "hidden"]
    out["hidden"] = hidden[0].num_units if hidden else None
    out["layers"] = n
    return out


def plot_widths(before: dict, after: dict, path: Path) -> Path:
    """Bar plot of kept query heads and MLP channels per layer (before vs after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, title in zip(axes, ("heads", "intermediate"), ("query heads", "MLP channels")):
        n = len(before[key])
        ax.bar(range(n), before[key], color="#cccccc", label="before")
        ax.bar(range(len(after[key])), after[key], color="#3b6ea8", label="kept")
        ax.set_title(f"{title} per layer")
        ax.set_xlabel("layer (after renumbering for 'kept')")
    axes[0].legend()
    fig.suptitle(f"hidden {before['hidden']} -> {after['hidden']}, layers {before['layers']} -> {after['layers']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_prune(model, tokenizer, cfg: PruneConfig, importance: ImportanceConfig | None = None,
              out_dir: str | Path | None = None, recipe: dict | None = None, export_dir: str | Path | None = None,
              ids: torch.Tensor | None = None, data=None, export_dtype: str | None = None,
              max_shard_size: int | str = MAX_SHARD_SIZE) -> tuple[torch.nn.Module, PrunePlan, dict]:
    """Prune ``model`` in place to ``cfg.target``; return ``(model, last plan, report)``.

    ``ids`` (LongTensor ``[n, L]``) overrides the calibration sampler; otherwise calibration text comes
    from ``importance.source``, else ``data`` (a recipe's ``DataConfig``), else the shipped corpus.
    With ``importance.device`` the model is scored and sliced there, then moved back. With ``out_dir`` the report
    (``report.json``), the plans (``plans.json``) and the width plot (``kept_widths.png``) are written;
    with ``export_dir`` the model is exported (``shear.prune.export.export``) with ``recipe``, its weights
    cast in place to ``export_dtype`` (None: as they are) and sharded at ``max_shard_size``.
    """
    icfg = importance or ImportanceConfig()
    home = _move_for_scoring(model, icfg.device)
    try:
        return _run_prune(model, tokenizer, cfg, icfg, out_dir, recipe, export_dir, ids, data,
                          dict(dtype=export_dtype, max_shard_size=max_shard_size))
    finally:
        if home is not None:
            model.to(home)


def prune_with_vocab(model, tokenizer, cfg: PruneConfig, importance: ImportanceConfig | None = None,
                     out_dir=None, recipe: dict | None = None, export_dir=None, data=None, teacher=None,
                     export_dtype: str | None = None, max_shard_size: int | str = MAX_SHARD_SIZE):
    """:func:`run_prune`, after ``cfg.vocab`` (when set) trims the token table of ``model`` (and of ``teacher``, so
    KD sees the same ids) to the tokens its text uses. Returns ``(model, tokenizer, report)``: the tokenizer is
    the trimmed one when a trim happened. A ratio target counts from the model before the trim (it becomes a
    parameter budget); a budget the trim alone meets is an error (nothing left for the structures)."""
    written = dict(export_dtype=export_dtype, max_shard_size=max_shard_size)
    if cfg.vocab is None:
        model, _, report = run_prune(model, tokenizer, cfg, importance, out_dir, recipe, export_dir, data=data, **written)
        return model, tokenizer, report
    from shear.data.text import DataConfig, calibration_texts
    from shear.prune.vocab import VocabConfig, select_vocab, token_counts, trim_vocab_

    v = cfg.vocab
    dcfg = DataConfig(source=v.source) if v.source is not None else (data or DataConfig(source="shakespeare"))
    texts = calibration_texts(dcfg, whole=v.source is not None)
    p0, v0 = sum(p.numel() for p in model.parameters()), model.config.vocab_size
    keep = select_vocab(tokenizer, token_counts(tokenizer, texts),
                        VocabConfig(min_count=v.min_count, max_size=v.max_size, keep_ascii=v.keep_ascii))
    new_tok = trim_vocab_(model, tokenizer, keep)
    if teacher is not None:
        trim_vocab_(teacher, tokenizer, keep)
    p1 = sum(p.numel() for p in model.parameters())
    info = {"source": str(dcfg.source), "tokens_before": v0, "tokens_after": int(len(keep)),
            "params_before": p0, "params_after": p1}
    log.info("vocabulary: %d -> %d tokens (text: %s), params %d -> %d", v0, len(keep), dcfg.source, p0, p1)
    target = cfg.target
    if target.ratio is not None:
        budget = int(p0 * (1 - target.ratio))
        if p1 <= budget:
            raise ValueError(f"prune.vocab: the vocabulary trim alone leaves {p1:,} of {p0:,} parameters, within the "
                             f"target ({budget:,}); nothing is left for prune.structures; lower prune.target or drop it")
        cfg = cfg.model_copy(update={"target": target.model_copy(update={"ratio": None, "params": budget})})
    model, _, report = run_prune(model, new_tok, cfg, importance, out_dir, recipe, export_dir, data=data, **written)
    report.update(vocab=info, params_before=p0, removed_ratio=1 - report["params_after"] / p0)
    if out_dir is not None:
        (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return model, new_tok, report


def _move_for_scoring(model, device: str | None):
    """Move ``model`` to ``importance.device``; return where it was (None: not moved)."""
    from shear.models import resolve_device

    device = resolve_device(device)
    if device is None:
        return None
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        raise ValueError("importance.device: the model is spread over devices (model.device_map); leave "
                         "importance.device unset to score it where it is")
    home = next(model.parameters()).device
    model.to(device)
    return home


def _run_prune(model, tokenizer, cfg, icfg, out_dir, recipe, export_dir, ids, data, written):
    check_settings(cfg, icfg)
    calib, t_calib = None, 0.0
    t0 = time.time()
    with PeakMemory() as mem:
        graph = analyze(model, heads=cfg.heads)
        refused = graph.meta.get("refused", {})
        for s in (*cfg.structures, *cfg.structure_ratios):
            if s in refused:
                raise ValueError(f"prune.structures: {s}: {refused[s]}")
        before_w, p0, macs0 = layer_widths(graph), graph.total_params, graph.total_macs
        if ids is None and needs_data(icfg, kinds_needed(cfg)):
            from shear.data.calibration import calibration_for

            tc = time.time()
            ids, calib = calibration_for(model, tokenizer, icfg.source, data, icfg.n_samples, icfg.seq_len, icfg.seed)
            t_calib = time.time() - tc
        res = prune_to_target_(model, cfg, icfg, ids)
        after = analyze(model, heads=cfg.heads)
    report = prune_report(cfg, icfg, res, before_w, p0, macs0, after, model, ids, calib, t_calib, t0, mem)
    write_outputs(out_dir, res.plans, before_w, report)
    if export_dir is not None:
        from shear.prune.export import export

        export(model, export_dir, tokenizer=tokenizer, recipe=recipe, **written)
        report["model_dir"] = str(export_dir)
        report["vm_hwm_mb"] = peak_rss_mb()  # the export included
    return model, res.plans[-1], report


def prune_report(cfg, icfg, res, before_w: dict, p0: int, macs0: int, after: StructureGraph, model, ids, calib,
                 t_calib: float, t0: float, mem: PeakMemory) -> dict:
    """The report of one prune (in memory or streamed): target, params and MACs before/after, widths per layer,
    bias compensation, seconds per phase, peak memory, calibration. ``model``: the pruned model (its weights'
    bytes; on meta for a streamed run, counted from their shapes in the dtype they are held in)."""
    t = {"calibration": t_calib, **res.time_s}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "estimator": icfg.estimator, "layer_estimator": icfg.layer_estimator, "aggregation": icfg.aggregation,
        "target": cfg.target.model_dump(exclude_none=True), "structures": cfg.structures,
        "allocation": cfg.allocation, "heads": cfg.heads, "iterative_steps": len(res.plans),
        "params_before": p0, "params_after": after.total_params, "removed_ratio": 1 - after.total_params / p0,
        "macs_before": macs0, "macs_after": after.total_macs, "mac_ratio": after.total_macs / macs0,
        "widths_before": before_w, "widths_after": layer_widths(after),
        "bias_compensation": {"flags": res.flags, "compensated": len(res.compensated), "skipped": res.skipped,
                              "zero_bias_params": res.zero_bias_params, "zero_biases": res.zero_biases}
        if res.compensate else None,
        "time_s": {**{k: round(v, 3) for k, v in t.items()}, "total": round(time.time() - t0, 3)},
        "peak_rss_mb": round(mem.peak / 2**20, 1), "rss_start_mb": round(mem.start / 2**20, 1), "vm_hwm_mb": peak_rss_mb(),
        "cuda_peak_mb": round(mem.cuda_peak / 2**20, 1), "weights_after_mb": round(weights / 2**20, 1),
        "calibration": None if ids is None else list(ids.shape), "calibration_text": calib,
    }


def write_outputs(out_dir, plans: list, before_w: dict, report: dict) -> None:
    """``plans.json``, ``kept_widths.png`` and ``report.json`` into ``out_dir`` (None: nothing)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps([{"remove": p.remove, "meta": p.meta} for p in plans], indent=1))
    report["plot"] = str(plot_widths(before_w, report["widths_after"], out / "kept_widths.png"))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
