"""``sparsify_(model, SparsifyConfig(...), ids)``: zero weights of the linears inside the blocks, one block
at a time (glue: module selection, hooks, the block loop; the math is in masks / sparsegpt / owl).

Layer-sequential calibration as SparseGPT and Wanda do it: the model runs up to block 0 once
(``capture_block_inputs``); then for each block, hooks on its selected linears collect what the
method needs from the block's inputs (Wanda: ``||X_j||^2`` per input channel; SparseGPT: the fp32
Hessian ``H = 2 X^T X``), every selected linear of the block is pruned with that, and the PRUNED block
runs again on the same inputs to produce the next block's inputs. Memory beyond the weights: one
block's inputs/outputs for the calibration set plus the statistics of one block's linears, each
freed as soon as its linear is pruned. Magnitude needs no data.

No family entry is needed: the blocks are the longest ``nn.ModuleList`` of one block class, block 0's
inputs and each block's keyword arguments are caught on the way in (``capture_block_inputs``), and every Linear/Conv1D inside a block is a
target unless ``targets`` narrows it.

Weights are read as ``[out, in]``; GPT-2's Conv1D (``[in, out]``) is transposed for the math and back.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from shear.importance.calibrate import STATS_FIX, blocks_path, capture_block_inputs, decoder_layers, is_matmul  # noqa: F401 (blocks_path re-exported)
from shear.models import check_finite
from shear.sparse.config import SparsifyConfig
from shear.sparse.masks import mask_for, wanda_scores
from shear.sparse.owl import outlier_ratio, owl_sparsities
from shear.sparse.sparsegpt import Hessian, sparsegpt_prune

log = logging.getLogger("shear")


@dataclass
class SparsifyResult:
    """``plan``: one entry per block: index, target sparsity (None for N:M), achieved sparsity and per linear
    (full module name) its zeros, numel, sparsity and, for SparseGPT, the relative reconstruction
    error ``||WX - W_hat X||^2 / ||WX||^2`` on the calibration inputs. ``pruned``: the linears' names."""

    plan: list[dict] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    owl_ratios: list[float] | None = None
    time_s: dict = field(default_factory=dict)


def _has_conv1d(model: nn.Module) -> bool:
    """GPT-2-style ``Conv1D`` weights (``[in, out]``) inside the blocks: from the family, else by structure."""
    from shear.analyze.families import family_of

    fam = family_of(model)
    if fam is not None:
        return fam.conv1d
    return any(type(m).__name__ == "Conv1D" for m in decoder_layers(model).modules())


def weight_matrix(mod: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view; Conv1D stores ``[in, out]``)."""
    return mod.weight.t() if conv1d and type(mod).__name__ == "Conv1D" else mod.weight


def set_weight_matrix(mod: nn.Module, w: torch.Tensor, conv1d: bool) -> None:
    """Write ``w [out, in]`` into the module's weight in its own layout and dtype."""
    weight_matrix(mod, conv1d).copy_(w.to(mod.weight.dtype))


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def select_linears(model: nn.Module, targets: list[str] | None) -> dict[int, list[str]]:
    """``{block index: [full module names]}`` of the linears to prune; ``targets`` None = all in the blocks.

    The blocks are a family's, else found by structure (``shear.importance.calibrate.decoder_layers``):
    any causal LM with a stack of identical blocks is sparsified without a family entry.

    Every entry of ``targets`` must match at least one linear inside the blocks; one that only matches
    outside them (``lm_head``, embeddings, BERT's pooler) is refused: blocks are what is calibrated.
    """
    names = {m: n for n, m in model.named_modules()}
    per_block: dict[int, list[str]] = {}
    inside = set()
    for i, block in enumerate(decoder_layers(model)):
        for mod in block.modules():
            if is_matmul(mod):
                inside.add(names[mod])
                per_block.setdefault(i, []).append(names[mod])
    if not per_block:
        raise ValueError(f"sparsify: {type(model).__name__}: no nn.Linear (or Conv1D) inside its blocks")
    if targets is None:
        return per_block
    everything = [n for n, m in model.named_modules() if n]
    problems = []
    for t in targets:
        if not any(_matches(n, t) for n in inside):
            where = [n for n in everything if _matches(n, t)]
            problems.append(f"{t!r} matches {'only ' + ', '.join(where[:3]) + ' outside the blocks' if where else 'no linear'}")
    if problems:
        raise ValueError("sparsify.targets: " + "; ".join(problems))
    chosen = {i: [n for n in ns if any(_matches(n, t) for t in targets)] for i, ns in per_block.items()}
    return {i: ns for i, ns in chosen.items() if ns}


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_block(block: nn.Module, hidden: list, kws: list, on_batch=None) -> list:
    """Outputs of ``block`` for every stored batch (``on_batch(n_seqs)`` is called before each)."""
    dev = next(block.parameters()).device
    outs = []
    for h, (args, kw) in zip(hidden, kws):
        if on_batch is not None:
            on_batch(h.shape[0])
        out = block(h.to(dev), *_to(args, dev), **_to(kw, dev))
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class _Collector:
    """Forward hooks that accumulate each selected linear's input statistics for one block."""

    def __init__(self, mods: dict[str, nn.Module], method: str, conv1d: bool):
        self.stats, self.n_seqs, self.handles = {}, 0, []
        for name, mod in mods.items():
            d = weight_matrix(mod, conv1d).shape[1]
            dev = mod.weight.device
            self.stats[name] = Hessian.zeros(d, dev) if method == "sparsegpt" else torch.zeros(d, dtype=torch.float64, device=dev)
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def set_batch(self, n_seqs: int) -> None:
        self.n_seqs = n_seqs

    def _hook(self, name):
        def hook(_m, inp, _out):
            x = inp[0].detach()
            st = self.stats[name]
            if isinstance(st, Hessian):
                st.add(x, self.n_seqs)
            else:
                xf = x.reshape(-1, x.shape[-1]).double()
                st += (xf * xf).sum(0)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


#: Hessians this big go to a temporary file while SparseGPT inverts them and updates the weights (peak memory)
SPILL_BYTES = 256 << 20


def _prune_linear(name: str, mod: nn.Module, cfg: SparsifyConfig, sparsity: float | None, stat, conv1d: bool) -> dict:
    w = weight_matrix(mod, conv1d)
    rel = None
    if stat is not None:  # a nan Hessian is not a matter of more samples or more dampening
        check_finite([(name, stat.H if cfg.method == "sparsegpt" else stat)],
                     "sparsify: calibration statistics of the input of", STATS_FIX)
    if cfg.method == "sparsegpt":
        damp = cfg.dampening
        big = stat.H.numel() * stat.H.element_size() >= SPILL_BYTES
        box = [stat.H] if big else None  # sparsegpt_prune owns a big Hessian (spills it during the update)
        if big:
            stat.H = None
        for attempt in range(4):
            try:
                new, _, rel = sparsegpt_prune(w, box if big else stat.H, sparsity, cfg.nm, cfg.blocksize, damp)
                break
            except torch.linalg.LinAlgError:
                if attempt == 3:
                    raise ValueError(f"sparsify: the Hessian of {name} is not positive definite even with dampening "
                                     f"{damp}; use more calibration samples or a larger sparsify.dampening") from None
                damp = max(damp * 10, 1e-3)
                log.warning("sparsify: %s: Hessian not positive definite, retrying with dampening %g", name, damp)
    else:
        x_norm = stat.sqrt() if stat is not None else None
        new = w.float() * mask_for(cfg.method, w, sparsity, cfg.nm, x_norm)
    set_weight_matrix(mod, new, conv1d)
    zeros = int((mod.weight == 0).sum())
    rec = {"zeros": zeros, "numel": mod.weight.numel(), "sparsity": round(zeros / mod.weight.numel(), 6)}
    if rel is not None:
        rec["rel_error"] = round(rel, 6)
    return rec


def _owl_plan(model, selected: dict[int, list[str]], ids: torch.Tensor, cfg: SparsifyConfig, conv1d: bool):
    """Per-block sparsities from the DENSE model's Wanda-score outlier ratios (as OWL computes them)."""
    from shear.importance.calibrate import collect_activation_stats

    names = {n for ns in selected.values() for n in ns}
    stats = collect_activation_stats(model, ids, cfg.batch_size, modules=names)
    ratios = []
    for i in sorted(selected):
        scores = [wanda_scores(weight_matrix(model.get_submodule(n), conv1d), stats.linears[n].x_sqsum.sqrt())
                  for n in selected[i]]
        ratios.append(outlier_ratio(scores, cfg.owl_m))
    return ratios, owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)


@torch.no_grad()
def sparsify_(model: nn.Module, cfg: SparsifyConfig, ids: torch.Tensor | None = None) -> SparsifyResult:
    """Zero weights of ``model``'s selected linears in place (see the module docstring).

    ``ids``: LongTensor ``[n_samples, seq_len]`` of calibration tokens (not needed for uniform magnitude).
    """
    conv1d = _has_conv1d(model)
    t0 = time.time()
    selected = select_linears(model, cfg.targets)
    res = SparsifyResult(pruned=[n for i in sorted(selected) for n in selected[i]])
    needs_data = cfg.method != "magnitude" or cfg.allocation == "owl"
    if needs_data and ids is None:
        raise ValueError(f"sparsify: method {cfg.method} / allocation {cfg.allocation} needs calibration ids")
    was_training = model.training
    model.eval()
    try:
        sparsity = {i: cfg.sparsity for i in selected}
        if cfg.allocation == "owl":
            res.owl_ratios, allocated = _owl_plan(model, selected, ids, cfg, conv1d)
            sparsity = dict(zip(sorted(selected), allocated))
        t_plan = time.time()
        res.time_s["allocation"] = round(t_plan - t0, 3)
        per_linear = _sequential(model, selected, sparsity, ids, cfg, conv1d)
        res.time_s["prune"] = round(time.time() - t_plan, 3)
    finally:
        model.train(was_training)
    res.plan = layer_plan(selected, sparsity, per_linear, cfg)
    res.time_s["total"] = round(time.time() - t0, 3)
    return res


def layer_plan(selected: dict[int, list[str]], sparsity: dict, per_linear: dict[str, dict], cfg: SparsifyConfig) -> list[dict]:
    """:attr:`SparsifyResult.plan` from the per-linear records (full names) of every block."""
    plan = []
    for i in sorted(selected):
        lin = {n: per_linear[n] for n in selected[i]}
        z, n = sum(r["zeros"] for r in lin.values()), sum(r["numel"] for r in lin.values())
        plan.append({"layer": i, "sparsity": sparsity[i], "pattern": cfg.pattern, "achieved": round(z / n, 6),
                     "linears": lin})
    return plan


def sparsify_block(block: nn.Module, names: list[str], hidden: list | None, kws: list | None, sparsity: float | None,
                   cfg: SparsifyConfig, conv1d: bool, run: bool = True, prefix: str = "") -> tuple[list | None, dict]:
    """Prune the linears ``names`` (paths relative to ``block``) of one block; return ``(outputs, records)``.

    ``hidden[b]``: the block's input ``[B, L, hidden]`` for batch ``b`` and ``kws[b]`` its ``(args, kwargs)``
    (``capture_block_inputs``; None for magnitude, which reads no data). The selected linears' input
    statistics are collected over all batches first, then each linear is pruned with them; ``outputs``
    are the PRUNED block's outputs on the same inputs (the next block's inputs) when ``run``, else None.
    ``records[name]``: zeros, numel, sparsity (and SparseGPT's rel_error); ``prefix`` names them in errors.
    The in-memory loop (:func:`sparsify_`) and the streamed one (``shear.sparse.stream``) share this step.
    """
    mods = {n: block.get_submodule(n) for n in names}
    stats = {}
    if mods and cfg.method != "magnitude":
        col = _Collector(mods, cfg.method, conv1d)
        try:
            _run_block(block, hidden, kws, col.set_batch)
        finally:
            col.remove()
        stats = col.stats
    records = {}
    for name, mod in mods.items():
        records[name] = _prune_linear(prefix + name, mod, cfg, sparsity, stats.pop(name, None), conv1d)
    return (_run_block(block, hidden, kws) if run else None), records


def _sequential(model, selected, sparsity, ids, cfg: SparsifyConfig, conv1d: bool) -> dict[str, dict]:
    """Every block in turn through :func:`sparsify_block`; each sees the PRUNED outputs of the one before."""
    data = cfg.method != "magnitude"
    hidden, kws = capture_block_inputs(model, ids, cfg.batch_size) if data else (None, None)
    path = blocks_path(model)
    out: dict[str, dict] = {}
    for i, block in enumerate(decoder_layers(model)):
        prefix = f"{path}.{i}."
        later = any(j > i for j in selected)
        names = [n[len(prefix):] for n in selected.get(i, [])]
        hidden, recs = sparsify_block(block, names, hidden, kws[i] if data else None, sparsity.get(i), cfg, conv1d,
                                      run=data and later, prefix=prefix)
        out.update({prefix + n: r for n, r in recs.items()})
        if not later:
            break
    return out
