"""``run_compare``: structured vs unstructured vs N:M at equal non-zero parameters and equal bytes.

    model, report = load_model("reference-quick"), run_compare(model, tok, CompareConfig(ratios=[0.3, 0.5]), "out")

For each budget R (a share of the model's parameters removed):

- **structured** rows (``shear prune``'s estimators and allocations, e.g. FLAP ``global`` and ``pool``):
  the first one's parameter count is the budget;
- **unstructured, = non-zero**: the block linears sparsified (SparseGPT by default) at the share
  that leaves the model exactly that many non-zero parameters (``budget.sparsity_for_nonzero``; the
  few weights left over by per-block rounding are trimmed by magnitude and counted in the report);
- **unstructured, = bytes**: the count whose compressed-tensors bitmask weights take the bytes of the
  first structured row's safetensors (index bytes cost non-zeros);

plus, once for all budgets, the dense model (its KD row is the control: the same tokens on the
unpruned model) and the N:M row (a fixed share of the block linears: its count is what it is). Every
row is scored on held-out text without recovery and after the same KD recipe (same data order,
teacher = the dense model, masks kept for sparse rows), exported to measure bytes on disk, and timed
on CPU at batch 1 with all models interleaved (masked models run dense: no sparse kernel).
"""
from __future__ import annotations

import copy
import json
import logging
import platform
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shear.compare.budget import nonzero_for_bytes, nonzero_params, sparsity_for_nonzero, trim_to_nonzero_
from shear.compare.config import CompareConfig, parse_structured

log = logging.getLogger("shear")


@dataclass
class Row:
    """One model of the comparison. ``budget``: the removed share it was built for (None: dense, N:M)."""

    name: str
    kind: str  # dense | structured | unstructured | nm
    budget: float | None = None
    params: int = 0
    nonzero: int = 0
    linear_sparsity: float | None = None  # share of the block linears' weights that are zero
    dense_bytes: int | None = None  # safetensors weights of the dense export (zeros stored)
    compressed_bytes: int | None = None  # safetensors weights of the compressed-tensors export
    compressed_format: str | None = None
    ppl: float | None = None  # held-out, no recovery
    ppl_kd: float | None = None  # held-out, after kd_steps of KD
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    kernel_prefill_tok_s: float | None = None  # the same model with shear.kernels' SparseLinear (sparse rows)
    kernel_decode_tok_s: float | None = None
    notes: list[str] = field(default_factory=list)
    time_s: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name if self.budget is None else f"{self.budget:g}/{self.name}"


@dataclass
class _Ctx:
    """What every row shares: the dense model and teacher, calibration, held-out tokens, KD data."""

    cfg: CompareConfig
    dense: nn.Module
    tokenizer: object
    out: Path
    calib: torch.Tensor
    eval_ids: torch.Tensor
    train_ds: object = None
    val_ds: object = None
    teacher: nn.Module | None = None
    models: dict = field(default_factory=dict)  # row key -> final model (for the speed rounds)
    protocol: dict = field(default_factory=dict)


def run_compare(model: nn.Module, tokenizer, cfg: CompareConfig, out_dir: str | Path) -> dict:
    """Build, score, recover, export and time every row; write ``table.md``, ``compare.png`` and
    ``report.json`` into ``out_dir``; return the report. ``model`` (the dense original) is not modified."""
    t0 = time.time()
    ctx = _setup(model, tokenizer, cfg, Path(out_dir))
    rows = [_dense_row(ctx)]
    for ratio in cfg.ratios:
        group = [_structured_row(ctx, spec, ratio) for spec in cfg.structured]
        rows += group
        rows += _unstructured_rows(ctx, ratio, group[0])
    if cfg.pattern is not None:
        rows.append(_nm_row(ctx))
    kernel = _with_sparse_kernel(ctx, rows) if cfg.sparse_kernel else None
    speed = interleaved_speed(ctx.models, cfg)
    for r in rows:
        r.prefill_tok_s, r.decode_tok_s = speed[r.key]["prefill_tok_s"], speed[r.key]["decode_tok_s"]
        if f"{r.key} [SparseLinear]" in speed:
            k = speed[f"{r.key} [SparseLinear]"]
            r.kernel_prefill_tok_s, r.kernel_decode_tok_s = k["prefill_tok_s"], k["decode_tok_s"]
    from shear.compare.table import markdown_table, plot

    report = {"config": cfg.model_dump(mode="json"), "rows": [dict(asdict(r), key=r.key) for r in rows],
              "ppl_protocol": ctx.protocol, "speed": speed, "sparse_kernel": kernel, "machine": machine(cfg),
              "kd_tokens": cfg.kd_steps * cfg.batch_size * cfg.seq_len, "wall_s": round(time.time() - t0, 1)}
    table = markdown_table(rows, report)
    (ctx.out / "table.md").write_text(table)
    report["plot"] = str(plot(rows, cfg, ctx.out / "compare.png"))
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _setup(model, tokenizer, cfg: CompareConfig, out: Path) -> _Ctx:
    from shear.data.text import DataConfig, build_datasets, calibration_ids
    from shear.eval.perplexity import load_eval_text

    from shear.data.calibration import resolve_calibration

    out.mkdir(parents=True, exist_ok=True)
    dense = model.eval()
    if cfg.source is None:  # the text shear trained the model on, else general English (as shear prune)
        cfg.source = resolve_calibration(model, key="compare.source").source
    if cfg.eval_dataset is None:  # a named corpus's own validation split; for the user's text, English
        cfg.eval_dataset = cfg.source if cfg.source in ("english", "shakespeare") else "english"
    log.info("compare: calibration and KD text %s, held-out text %s (validation split)", cfg.source, cfg.eval_dataset)
    data = DataConfig(source=cfg.source, seq_len=cfg.seq_len, seed=cfg.seed)
    calib = calibration_ids(tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed, data=data)
    enc = tokenizer(load_eval_text(cfg.eval_dataset, "validation"), add_special_tokens=False,
                    return_attention_mask=False, verbose=False)
    ctx = _Ctx(cfg, dense, tokenizer, out, calib, torch.tensor(enc["input_ids"], dtype=torch.long))
    if cfg.kd_steps:
        ctx.train_ds, ctx.val_ds = build_datasets(data, tokenizer)
        ctx.teacher = copy.deepcopy(dense).eval().requires_grad_(False)
    return ctx


def held_out_ppl(ctx: _Ctx, model: nn.Module) -> float:
    from shear.eval.perplexity import perplexity

    c = ctx.cfg
    protocol = {"dataset": c.eval_dataset, "split": "validation"}
    r = perplexity(model.eval(), ctx.eval_ids, c.seq_len, None, c.eval_batch_size, c.eval_windows, protocol)
    ctx.protocol = r.protocol
    return r.ppl


def _kd(ctx: _Ctx, model: nn.Module, masks: dict | None) -> tuple[nn.Module, dict]:
    """The same KD recipe for every row: CE + forward KL to the dense model, same data order; masks kept."""
    from shear.train.config import DistillConfig, TrainConfig
    from shear.train.trainer import train

    c = ctx.cfg
    tcfg = TrainConfig(steps=c.kd_steps, batch_size=c.batch_size, lr=c.lr, warmup_steps=max(1, c.kd_steps // 10),
                       eval_batches=4, log_every=max(1, c.kd_steps // 5), seed=c.seed, resume=False, precision="fp32")
    dcfg = DistillConfig(ce_weight=c.ce_weight, kd_weight=c.kd_weight, temperature=c.temperature)
    with tempfile.TemporaryDirectory(dir=ctx.out, prefix=".train-") as d:
        res = train(model, ctx.train_ds, ctx.val_ds, tcfg, d, teacher=ctx.teacher, distill=dcfg, masks=masks)
    keep = ("final_train_loss", "final_val_ppl", "tokens_per_s", "train_s", "sparse_masks")
    return res.model.eval(), {k: res.metrics[k] for k in keep if k in res.metrics}


def _finish(ctx: _Ctx, row: Row, model: nn.Module, pruned: list[str] | None = None, nm=None) -> Row:
    """Score without recovery, recover by KD, export (bytes), count; the final model joins the speed rounds."""
    t = time.time()
    row.ppl = held_out_ppl(ctx, model)
    masks = None
    if pruned:
        from shear.sparse.recovery import zero_masks

        masks = zero_masks(model, pruned)
        row.linear_sparsity = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    before = nonzero_params(model)
    if ctx.cfg.kd_steps:
        model, metrics = _kd(ctx, model, masks)
        row.ppl_kd = held_out_ppl(ctx, model)
        row.time_s["kd"] = metrics.get("train_s")
        if pruned and nonzero_params(model) > before:
            raise RuntimeError(f"{row.name}: KD gave pruned weights non-zero values ({before} -> {nonzero_params(model)})")
    row.params = sum(p.numel() for p in model.parameters())
    row.nonzero = nonzero_params(model)
    _measure_bytes(ctx, row, model, pruned, nm)
    row.time_s["score_kd_export"] = round(time.time() - t, 1)
    ctx.models[row.key] = model
    log.info("compare: %s: params %s, non-zero %s, PPL %.2f%s", row.key, f"{row.params:,}", f"{row.nonzero:,}", row.ppl,
             f" -> {row.ppl_kd:.2f} after KD" if row.ppl_kd is not None else "")
    return row


def _measure_bytes(ctx: _Ctx, row: Row, model: nn.Module, pruned: list[str] | None, nm) -> None:
    from shear.prune.export import export
    from shear.sparse.export import bytes_on_disk, save_compressed

    slug = re.sub(r"[^A-Za-z0-9.]+", "-", row.key).strip("-")  # "0.3/structured flap:pool" -> 0.3-structured-flap-pool
    root = ctx.out / "models" / slug if ctx.cfg.keep_models else Path(tempfile.mkdtemp(dir=ctx.out, prefix=".export-"))
    try:
        export(model, root / "model", tokenizer=ctx.tokenizer, overwrite=True)
        row.dense_bytes = bytes_on_disk(root / "model")["weights"]
        if pruned:
            info = save_compressed(model, root / "compressed", pruned, nm, tokenizer=ctx.tokenizer, overwrite=True)
            row.compressed_bytes = bytes_on_disk(root / "compressed")["weights"]
            row.compressed_format = info["format"]
    finally:
        if not ctx.cfg.keep_models:
            shutil.rmtree(root, ignore_errors=True)


def _dense_row(ctx: _Ctx) -> Row:
    row = Row("dense" + (" (KD: control, same tokens)" if ctx.cfg.kd_steps else ""), "dense")
    return _finish(ctx, row, copy.deepcopy(ctx.dense))


def _structured_row(ctx: _Ctx, spec: str, ratio: float) -> Row:
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune

    est, alloc, structures = parse_structured(spec)
    c = ctx.cfg
    model = copy.deepcopy(ctx.dense)
    t = time.time()
    _, _, rep = run_prune(model, ctx.tokenizer, PruneConfig(target={"ratio": ratio}, allocation=alloc, structures=structures),
                          ImportanceConfig(estimator=est, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed,
                                           standardize=True if alloc == "pool" else None),  # the pool needs one scale
                          ids=ctx.calib)
    row = Row(f"structured {spec}", "structured", ratio, time_s={"prune": round(time.time() - t, 1)})
    row.notes.append(f"removed {rep['removed_ratio']:.1%} of params")
    return _finish(ctx, row, model)


def _sparsify(ctx: _Ctx, *, sparsity: float | None = None, pattern: str | None = None):
    from shear.sparse.config import SparsifyConfig
    from shear.sparse.pipeline import run_sparsify

    c = ctx.cfg
    cfg = SparsifyConfig(method=c.method, sparsity=sparsity, pattern=pattern, n_samples=c.n_samples,
                         seq_len=c.seq_len, seed=c.seed)
    model = copy.deepcopy(ctx.dense)
    t = time.time()
    model, rep = run_sparsify(model, ctx.tokenizer, cfg, ids=ctx.calib)
    return model, rep["pruned"], cfg.nm, round(time.time() - t, 1)


def _block_linears(model: nn.Module) -> list[str]:
    from shear.sparse.sequential import select_linears

    return [n for names in select_linears(model, None).values() for n in names]


def _unstructured_at(ctx: _Ctx, name: str, ratio: float, budget: int) -> Row:
    """Sparsify the block linears so that the model keeps ``budget`` non-zero parameters, exactly."""
    s = sparsity_for_nonzero(ctx.dense, _block_linears(ctx.dense), budget)
    model, pruned, _, secs = _sparsify(ctx, sparsity=s)
    trimmed = trim_to_nonzero_(model, pruned, budget)
    row = Row(name, "unstructured", ratio, time_s={"sparsify": secs})
    row.notes.append(f"{ctx.cfg.method} at {s:.2%} of the block linears" + (f"; {trimmed} rounding leftovers trimmed by "
                                                                             "magnitude" if trimmed else ""))
    return _finish(ctx, row, model, pruned)


def _unstructured_rows(ctx: _Ctx, ratio: float, anchor: Row) -> list[Row]:
    c = ctx.cfg
    rows = [_unstructured_at(ctx, f"unstructured {c.method}, = non-zero", ratio, anchor.nonzero)]
    if not c.equal_bytes:
        return rows
    elem = next(ctx.dense.parameters()).element_size()
    nnz = nonzero_for_bytes(rows[0].compressed_bytes, rows[0].nonzero, anchor.dense_bytes, elem)
    try:
        rows.append(_unstructured_at(ctx, f"unstructured {c.method}, = bytes", ratio, nnz))
    except ValueError as e:  # e.g. the index bytes alone exceed the structured model's size
        log.warning("compare: no equal-bytes row at %g: %s", ratio, e)
        return rows
    rows[-1].notes.append(f"target {anchor.dense_bytes:,} bytes (the {anchor.name} safetensors)")
    return rows


def _nm_row(ctx: _Ctx) -> Row:
    c = ctx.cfg
    model, pruned, nm, secs = _sparsify(ctx, pattern=c.pattern)
    row = Row(f"{c.pattern} {c.method}", "nm", time_s={"sparsify": secs})
    row = _finish(ctx, row, model, pruned, nm)
    dense = nonzero_params(ctx.dense)
    row.notes.append(f"removes {1 - row.nonzero / dense:.1%} of the non-zero params (fixed by the pattern)")
    return row


def _with_sparse_kernel(ctx: _Ctx, rows: list[Row]) -> dict | None:
    """Where ``shear.kernels`` is installed: a copy of every sparse row's model with its masked linears swapped
    to ``SparseLinear`` (CPU: CSR or dense per call, by that package's measured rule) joins the speed rounds."""
    try:
        from shear.kernels import to_sparse_linear_
    except ImportError:
        log.info("compare: shear.kernels is not installed: sparse rows are timed with dense execution only")
        return None
    swapped = {}
    for r in rows:
        if r.kind in ("unstructured", "nm"):
            m = copy.deepcopy(ctx.models[r.key])
            swapped[r.key] = len(to_sparse_linear_(m))
            ctx.models[f"{r.key} [SparseLinear]"] = m
    return {"swap": "shear.kernels.to_sparse_linear_ (default config)", "swapped_linears": swapped}


@torch.inference_mode()
def interleaved_speed(models: dict[str, nn.Module], cfg: CompareConfig) -> dict[str, dict]:
    """Batch-1 prefill and decode tokens/s of every model, measured in rounds that visit every model once
    (alternating order), so a change of load on shared cores hits all models alike; medians over rounds."""
    from shear.eval.speed import measure_speed

    def once(m):
        return measure_speed(m, cfg.prefill_tokens, cfg.decode_tokens, repeats=3, warmup=0, num_threads=cfg.threads)

    for m in models.values():  # warm-up round
        measure_speed(m, cfg.prefill_tokens, cfg.decode_tokens, repeats=1, warmup=1, num_threads=cfg.threads)
    runs: dict[str, list[dict]] = {k: [] for k in models}
    keys = list(models)
    for r in range(cfg.speed_rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            runs[k].append(once(models[k]))
    out = {}
    for k, rs in runs.items():
        pre, dec = [x["prefill_tok_s"] for x in rs], [x["decode_tok_s"] for x in rs]
        out[k] = {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
                  "prefill_range": [min(pre), max(pre)], "decode_range": [min(dec), max(dec)],
                  "rounds": len(rs), "threads": rs[0]["threads"]}
    return out


def machine(cfg: CompareConfig) -> dict:
    """CPU model, cores, torch and transformers versions, threads used for speed."""
    import os

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": cfg.threads or torch.get_num_threads(), "python": platform.python_version()}
