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

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from shear.checkpoint import Checkpoint, materialize_, release_, skeleton
from shear.importance.calibrate import capture_block_inputs, decoder_layers
from shear.memory import trim
from shear.models import DTYPES, check_finite, check_weights_finite, resolve_device
from shear.sparse.config import SparsifyConfig
from shear.sparse.sequential import (SparsifyResult, _has_conv1d, blocks_path, layer_plan, select_linears,
                                     sparsify_block)
from shear.storage import MAX_SHARD_SIZE

log = logging.getLogger("shear")


def check_streamable(cfg: SparsifyConfig) -> None:
    """Refuse, in one line, what the streamed path does not do."""
    if cfg.allocation == "owl":
        raise ValueError("sparsify --stream: OWL allocation needs a dense pass over every block first; "
                         "use --allocation uniform, or drop --stream")
    if cfg.compressed:
        raise ValueError("sparsify --stream writes the dense form only (the compressed-tensors writer needs the "
                         "whole model in memory); add --no-compressed")


def _tensors(model: nn.Module, ckpt: Checkpoint, written: torch.dtype) -> dict[str, tuple]:
    """``{name: (checkpoint key or None, shape, dtype written)}`` of what ``save_pretrained`` writes: the model's
    state dict, tied weights once. Floating parameters get ``written`` (those the class keeps in fp32 stay
    fp32, as :func:`shear.models.cast_weights_` leaves them), buffers and integer tensors their own dtype. A
    parameter missing from the checkpoint is refused; a persistent buffer missing from it is the model's own."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    params = {id(p) for p in model.parameters()}
    seen, out, missing = set(), {}, []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight (the LM head of tie_word_embeddings): written once
            continue
        seen.add(id(t))
        key = ckpt.key_for(model, name)
        is_param = id(t) in params
        if key is None and is_param:
            missing.append(name)
            continue
        dtype = t.dtype
        if is_param and t.is_floating_point() and not (written != torch.float32 and any(k in name for k in keep)):
            dtype = written
        elif key is not None and not t.is_floating_point():
            dtype = ckpt.dtype(key)
        out[name] = (key, list(t.shape), dtype)
    if missing:
        raise ValueError(f"{ckpt.path}: {len(missing)} of the model's tensors are not in the checkpoint under its "
                         f"names (first {missing[0]!r}); --stream reads checkpoints whose names are the model's")
    unused = sorted(set(ckpt.files) - {k for k, _, _ in out.values()})
    if unused:  # what from_pretrained reports as unexpected keys and does not load either
        log.warning("sparsify --stream: %d tensors of the checkpoint are not the model's and are not written: %s",
                    len(unused), ", ".join(unused[:4]))
    return out


def _group(specs: dict, path: str, n_blocks: int) -> tuple[list[str], list[list[str]]]:
    """The names outside the blocks, and per block its names (in state-dict order)."""
    outside, blocks = [], [[] for _ in range(n_blocks)]
    for name in specs:
        if name.startswith(path + "."):
            i = int(name[len(path) + 1:].split(".", 1)[0])
            blocks[i].append(name)
        else:
            outside.append(name)
    return outside, blocks


class _Stream:
    """The named steps of one streamed run: what it reads (``ckpt``), the skeleton it fills (``model``), what it
    writes (``specs``: ``{name: (checkpoint key, shape, dtype written)}``, into ``writer``)."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, specs: dict, writer, cfg: SparsifyConfig, device):
        self.model, self.ckpt, self.specs, self.writer, self.cfg, self.device = model, ckpt, specs, writer, cfg, device

    def read(self, names: list[str], strip: str = "") -> dict:
        """``{name without strip: tensor}``: from the checkpoint as stored, else (a buffer) the skeleton's own."""
        keys = {n: self.specs[n][0] for n in names}
        got = self.ckpt.read([k for k in keys.values() if k is not None])
        state = self.model.state_dict(keep_vars=True) if None in keys.values() else {}
        return {n[len(strip):]: (got[k] if k is not None else state[n].detach()) for n, k in keys.items()}

    def capture(self, outside: list[str], ids: torch.Tensor) -> tuple[list, list]:
        """Block inputs and kwargs of the calibration ids (``capture_block_inputs``), with the tensors outside
        the blocks read in for the pass and freed after it (not the LM head: the pass stops at the last block)."""
        model = self.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb = model.get_input_embeddings()
        skip = {n for n, p in model.named_parameters(remove_duplicate=False)
                if head is not None and p is head.weight and p is not emb.weight}
        names = [n for n in outside if n not in skip]
        materialize_(model, self.read(names), self.device, complete=False)
        try:
            return capture_block_inputs(model, ids, self.cfg.batch_size)
        finally:
            release_(model, set(names))
            trim()

    def copy(self, names: list[str]) -> None:
        """Write tensors outside the blocks as stored (cast to the written dtype), one at a time."""
        for name in names:
            t = self.read([name])[name]
            check_finite([(name, t)], f"{self.ckpt.path}: weight", "the checkpoint is damaged")
            self.writer.write(name, t.to(self.specs[name][2]))

    def block(self, block: nn.Module, prefix: str, names: list[str], selected: list[str], hidden, kws,
              run: bool, conv1d: bool) -> tuple[list | None, dict]:
        """Read one block (``names``: its tensors), prune its ``selected`` linears (:func:`sparsify_block`),
        write it, put it back on meta; return the pruned block's outputs (when ``run``) and the records."""
        materialize_(block, self.read(names, prefix), self.device)
        check_weights_finite(block, str(self.ckpt.path), prefix)
        rel = [n[len(prefix):] for n in selected]
        hidden, recs = sparsify_block(block, rel, hidden, kws, self.cfg.sparsity, self.cfg, conv1d, run=run,
                                      prefix=prefix)
        state = block.state_dict(keep_vars=True)
        for name in names:
            self.writer.write(name, state[name[len(prefix):]].detach().to(self.specs[name][2]))
        del state
        release_(block)  # freed by refcount
        trim()  # a gc pass (~0.2 s) and malloc_trim: else RSS grows block by block (cycles, glibc keeping the heap)
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
    specs = _tensors(model, ckpt, DTYPES[written])
    outside, per_block = _group(specs, bpath, len(blocks))
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
        _write_config(model, Path(path).expanduser(), tmp, DTYPES[written])
        seal(tmp, tokenizer, recipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res.plan = layer_plan(selected, {i: cfg.sparsity for i in selected}, per_linear, cfg)
    res.time_s["total"] = round(time.time() - t0, 3)
    return res, tmp


def _write_config(model: nn.Module, src: Path, tmp: Path, written: torch.dtype) -> None:
    """``config.json`` as ``save_pretrained`` writes it (the dtype the weights are written in), and the
    checkpoint's ``generation_config.json`` (else the model's own, for a model that generates)."""
    model.config.dtype = written
    model.config.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
    elif model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


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
    from shear.prune.export import move_in, staging_dir
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
            dest = Path(report_dir) / "report.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged.append(staging_dir(dest))
            staged[-1].write_text(json.dumps(report, indent=2, default=str))
            files = [(staged[-1], dest)]
        move_in([(tmp, out)], files, [Path(d) for d in drop])
    finally:
        for t in staged:
            if t.is_dir():
                shutil.rmtree(t)
            elif t.exists():
                t.unlink()
    return report
