"""``sparsify_streamed(path, cfg, out_dir)``: sparsify a checkpoint one block at a time, never holding the model.

    shear sparsify ~/models/llama-8b --method sparsegpt --sparsity 0.5 --stream --no-compressed -o runs/sgpt50

The model is built on the meta device from its ``config.json`` (:func:`shear.checkpoint.skeleton`). For a
calibrated method the tensors outside the blocks (embeddings, position embeddings, final norm; not the LM
head) are read from the shards, the model runs up to its blocks once per batch (``capture_block_inputs``:
block 0's inputs and each block's own keyword arguments), and they are freed again. Then, block by block:
its tensors are read from the shards (in the compute dtype), :func:`~shear.sparse.sequential.sparsify_block`
prunes it exactly as the in-memory loop does (same statistics, same masks, same SparseGPT updates, the
next block sees the pruned outputs), its tensors go to the output shards in the written dtype, and it goes
back to meta. The tensors outside the blocks are copied from the shards as they are (cast to the written
dtype). Peak memory: one block in fp32 + the calibration activations (+ the embeddings during the first
pass), whatever the depth.

Limits: the dense form only (the compressed-tensors writer needs the whole model), uniform allocation
only (OWL needs a dense pass over every block first), safetensors checkpoints whose tensor names are the
model's (those ``from_pretrained`` loads without converting them).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from shear.checkpoint import Checkpoint, materialize_, skeleton
from shear.importance.calibrate import decoder_layers
from shear.models import DTYPES, check_weights_finite, resolve_device
from shear.sparse.config import SparsifyConfig
from shear.sparse.sequential import (SparsifyResult, _has_conv1d, blocks_path, layer_plan, select_linears,
                                     sparsify_block)
from shear.storage import MAX_SHARD_SIZE
from shear.streaming import BlockStream, group_by_block, tensor_specs, write_config

log = logging.getLogger("shear")


def check_streamable(cfg: SparsifyConfig) -> None:
    """Refuse, in one line, what the streamed path does not do."""
    if cfg.allocation == "owl":
        raise ValueError("sparsify --stream: OWL allocation needs a dense pass over every block first; "
                         "use --allocation uniform, or drop --stream")
    if cfg.compressed:
        raise ValueError("sparsify --stream writes the dense form only (the compressed-tensors writer needs the "
                         "whole model in memory); add --no-compressed")


class _Stream(BlockStream):
    """A streamed sparsify run: :class:`~shear.streaming.BlockStream` and its per-block step."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, specs: dict, writer, cfg: SparsifyConfig, device):
        super().__init__(model, ckpt, specs, writer, cfg.batch_size, device)
        self.cfg = cfg

    def block(self, block: nn.Module, prefix: str, names: list[str], selected: list[str], hidden, kws,
              run: bool, conv1d: bool) -> tuple[list | None, dict]:
        """Read one block (``names``: its tensors), prune its ``selected`` linears (:func:`sparsify_block`),
        write it, put it back on meta; return the pruned block's outputs (when ``run``) and the records."""
        materialize_(block, self.read(names, prefix), self.device)
        check_weights_finite(block, str(self.ckpt.path), prefix)
        rel = [n[len(prefix):] for n in selected]
        hidden, recs = sparsify_block(block, rel, hidden, kws, self.cfg.sparsity, self.cfg, conv1d, run=run,
                                      prefix=prefix)
        self.write_block(block, prefix, names)
        return hidden, {prefix + n: r for n, r in recs.items()}


@torch.no_grad()
def sparsify_streamed(model: nn.Module, path: str | Path, cfg: SparsifyConfig, out_dir: str | Path,
                      ids: torch.Tensor | None = None, written: str = "fp32", tokenizer=None,
                      recipe: dict | None = None, overwrite: bool = False,
                      max_shard_size: int | str = MAX_SHARD_SIZE) -> tuple[SparsifyResult, Path]:
    """Sparsify the checkpoint at ``path`` block by block, staged for ``out_dir`` (see the module docstring).

    ``model``: its :func:`~shear.checkpoint.skeleton`, in the dtype blocks are pruned in
    (``shear.models.load_dtype``: fp32 on CPU); ``ids`` ``[n, L]``: calibration tokens (None for magnitude);
    ``written``: the dtype of the written weights. ``out_dir`` is checked first (``_check_target``); the export
    is written to its staging directory (``shear.prune.export.staging_dir``) and sealed (tokenizer, recipe,
    manifest). Returns the result (plan, times) and the staged directory, which the caller publishes
    (``shear.prune.export.move_in``) and removes on failure."""
    from shear.prune.export import _check_target, seal, staging_dir
    from shear.shards import ShardWriter

    check_streamable(cfg)
    t0 = time.time()
    device = torch.device(resolve_device(cfg.device) or "cpu")
    if device.type != "cpu":
        for name, b in list(model.named_buffers()):
            materialize_(model, {name: b}, device, complete=False)
    ckpt = Checkpoint(path)
    conv1d = _has_conv1d(model)
    selected = select_linears(model, cfg.targets)
    bpath, blocks = blocks_path(model), decoder_layers(model)
    specs = tensor_specs(model, ckpt, DTYPES[written], what="sparsify --stream")
    outside, per_block = group_by_block(specs, bpath, len(blocks))
    data = cfg.method != "magnitude"
    if data and ids is None:
        raise ValueError(f"sparsify: method {cfg.method} needs calibration ids")
    out = Path(out_dir).expanduser().resolve()
    _check_target(model, out, overwrite, (path,))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    tmp.mkdir()
    res = SparsifyResult(pruned=[n for i in sorted(selected) for n in selected[i]])
    res.time_s["allocation"] = round(time.time() - t0, 3)  # uniform: only the selection
    t_prune = time.time()
    try:
        order = outside + [n for names in per_block for n in names]  # the order they are written in
        run = _Stream(model, ckpt, specs, ShardWriter(tmp, {n: tuple(specs[n][1:]) for n in order}, max_shard_size),
                      cfg, device)
        hidden, kws = run.capture(outside, ids) if data else (None, None)
        run.copy(outside)
        per_linear = {}
        for i, block in enumerate(blocks):
            hidden, recs = run.block(block, f"{bpath}.{i}.", per_block[i], selected.get(i, []), hidden,
                                     kws[i] if data else None, data and any(j > i for j in selected), conv1d)
            per_linear.update(recs)
            if data:
                kws[i] = None
            log.info("sparsify --stream: block %d/%d written", i + 1, len(blocks))
        run.writer.close()
        res.time_s["prune"] = round(time.time() - t_prune, 3)
        write_config(model, Path(path).expanduser(), tmp, DTYPES[written])
        seal(tmp, tokenizer, recipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res.plan = layer_plan(selected, {i: cfg.sparsity for i in selected}, per_linear, cfg)
    res.time_s["total"] = round(time.time() - t0, 3)
    return res, tmp


def run_sparsify_streamed(path: str, tokenizer, cfg: SparsifyConfig, out_dir: str | Path, written: str = "fp32",
                          compute: str = "fp32", ids: torch.Tensor | None = None, recipe: dict | None = None,
                          overwrite: bool = False, max_shard_size: int | str = MAX_SHARD_SIZE,
                          trust_remote_code: bool = False, report_dir: str | Path | None = None,
                          drop: tuple = ()) -> dict:
    """``shear sparsify --stream``: calibration text, :func:`sparsify_streamed` into ``out_dir`` and the report
    ``run_sparsify`` + ``export_sparse`` write (the same fields; ``stream: true``; no compressed form). With
    ``report_dir`` the report is published with the export in one step (``move_in``, which also takes down
    shear's earlier exports in ``drop``), as ``export_sparse`` does."""
    import json

    from shear.data.calibration import calibration_for
    from shear.memory import peak_rss_mb
    from shear.models import check_vocab, checkpoint_dtype, source_weight_bytes
    from shear.prune.export import move_in, remove_staged, stage_file
    from shear.prune.pipeline import PeakMemory
    from shear.sparse.export import bytes_on_disk
    from shear.sparse.pipeline import calibration_length, sparsify_report

    check_streamable(cfg)
    t0 = time.time()
    model = skeleton(path, DTYPES[compute], trust_remote_code)
    calib, t_calib = None, 0.0
    if ids is None and cfg.method != "magnitude":
        check_vocab(model, tokenizer, str(path))
        tc = time.time()
        ids, calib = calibration_for(model, tokenizer, cfg.source, None, cfg.n_samples, calibration_length(model, cfg),
                                     cfg.seed, key="sparsify.source")
        t_calib = time.time() - tc
    staged = []
    try:
        with PeakMemory() as mem:
            res, tmp = sparsify_streamed(model, path, cfg, out_dir, ids, written, tokenizer, recipe, overwrite,
                                         max_shard_size)
        staged.append(tmp)
        report = sparsify_report(res, cfg, ids, calib, t_calib, t0, mem, model)
        out = Path(out_dir).expanduser().resolve()
        report["stream"] = True
        report["dtype"] = {"checkpoint": checkpoint_dtype(str(path)), "loaded": compute, "written": written}
        report["source_weight_bytes"] = source_weight_bytes(str(path))
        report["export"] = {"model": {"dir": str(out_dir), "bytes": bytes_on_disk(tmp)}, "dtype": written,
                            "dense_weight_bytes": report["dense_weight_bytes"]}
        report["vm_hwm_mb"] = peak_rss_mb()
        files = []
        if report_dir is not None:
            files = stage_file(Path(report_dir) / "report.json", json.dumps(report, indent=2, default=str), staged)
        move_in([(tmp, out)], files, [Path(d) for d in drop])
    finally:
        remove_staged(staged)
    return report
