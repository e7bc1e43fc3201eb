"""Gradient accumulation for Taylor criteria, in hooks that free each gradient as soon as it lands.

``register_post_accumulate_grad_hook`` runs once per parameter per backward, right after its
``.grad`` is written; the hook folds it into fp32 accumulators and sets ``.grad = None``, so no
full gradient copy of the model ever exists beyond one parameter's. What is kept depends on the
mode (``W`` = weight bytes in fp32):

- ``vector``: signed per-unit sums ``sum_{w in u} w g`` per (group, member) — a few KB;
- ``element1``: the mean gradient ``g`` (1 W);
- ``element2``: ``g`` and the diagonal Fisher ``mean_s g_s^2`` from per-sample backward passes (2 W).

Loss (:func:`objective`): a decoder's mean next-token cross-entropy; an encoder (no LM head to
trust) denoises itself: 15% of the tokens are replaced by random ones (seeded) and the loss is the
mean squared distance of the last hidden states to the clean input's, normalised by their mean
square — a reconstruction loss whose gradient is not zero at the dense model. ``g`` is the mean over
sequences.
Gradient checkpointing (HF ``gradient_checkpointing_enable``) trades compute for activations.

Under a multi-process launch (a torch.distributed process group) each rank runs every W-th batch and
the sums are all-reduced (:mod:`shear.distributed`): every rank ends with the statistics of the whole
calibration set, as one process computes them (up to the order of the float additions). The encoder
objective's corruption is seeded per batch, so it does not depend on which rank runs the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shear import distributed
from shear.analyze.graph import StructureGraph
from shear.importance.criteria import per_unit


@dataclass
class GradientStats:
    """Accumulated gradient information (see module docstring). Keys are parameter names."""

    mode: str
    grad: dict[str, torch.Tensor] = field(default_factory=dict)  # mean gradient (element modes)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # mean per-sample g^2 (element2)
    wg: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (group, member idx) -> [U]
    n_samples: int = 0
    loss: float = 0.0


def _members_by_param(graph: StructureGraph, kinds: set[str] | None):
    out: dict[str, list] = {}
    for g in graph.groups:
        if kinds is not None and g.kind not in kinds:
            continue
        for j, m in enumerate(g.members):
            out.setdefault(m.param, []).append((g.name, j, m))
    return out


def _fill_unreached(stats: GradientStats, by_param: dict, params: dict) -> None:
    """Zero statistics for members the loss does not reach (e.g. BERT's pooler under the encoder
    objective): their gradient is exactly zero, so their Taylor terms are zero, not missing."""
    for name, entries in by_param.items():
        if stats.mode == "vector":
            for gname, j, m in entries:
                stats.wg.setdefault((gname, j), torch.zeros(m.units.shape[0]))
        elif name not in stats.grad:
            stats.grad[name] = torch.zeros_like(params[name], dtype=torch.float32)
            if stats.mode == "element2":
                stats.fisher[name] = torch.zeros_like(params[name], dtype=torch.float32)


def objective(model: nn.Module, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The scalar loss the Taylor criteria differentiate (see the module docstring). ``batch``: ``[B, L]``;
    ``gen`` draws the encoder objective's corruption."""
    from shear.analyze.families import family_of

    fam = family_of(model)
    if fam is None or fam.causal:
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    with torch.no_grad():
        clean = model(input_ids=batch).last_hidden_state.float()
    noise = torch.rand(batch.shape, generator=gen) < 0.15
    vocab = model.get_input_embeddings().weight.shape[0]
    corrupt = torch.where(noise.to(batch.device), torch.randint(0, vocab, batch.shape, generator=gen).to(batch.device), batch)
    h = model(input_ids=corrupt).last_hidden_state.float()
    return ((h - clean) ** 2).mean() / clean.pow(2).mean().clamp_min(1e-12)


def accumulate_gradients(model: nn.Module, ids: torch.Tensor, graph: StructureGraph, mode: str = "vector",
                         batch_size: int = 8, kinds: set[str] | None = None,
                         checkpointing: bool = False, progress: bool = False) -> GradientStats:
    """Backward over the calibration ids ``[n, L]``; return :class:`GradientStats` for ``mode``.

    ``element2`` runs one sequence per backward (per-sample gradients, so the Fisher is a mean of
    squares, not the square of a mean). Parameters that are not group members get no gradient.
    Under a process group each rank runs its share of the batches and the results are all-reduced
    (module docstring): every rank must call this with the same ``ids``.
    """
    if mode not in ("vector", "element1", "element2"):
        raise ValueError(f"gradient mode: unknown {mode!r}")
    by_param = _members_by_param(graph, kinds)
    params = dict(model.named_parameters())
    missing = set(by_param) - set(params)
    if missing:
        raise ValueError(f"graph names parameters the model lacks: {sorted(missing)[:4]}")
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in by_param)
    stats = GradientStats(mode)
    n_total = ids.shape[0]
    bs = 1 if mode == "element2" else batch_size
    scale = {"w": 0.0}  # share of the mean carried by the current batch

    def hook_for(name: str):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            w = scale["w"]
            if mode == "vector":
                wgt = p.detach().float() * g
                for gname, j, m in by_param[name]:
                    s = per_unit(wgt, m.dim, m.units) * w
                    stats.wg[(gname, j)] = stats.wg.get((gname, j), 0) + s
            else:
                acc = stats.grad.get(name)
                stats.grad[name] = g * w if acc is None else acc.add_(g, alpha=w)
                if mode == "element2":
                    f = stats.fisher.get(name)
                    stats.fisher[name] = g * g / n_total if f is None else f.addcmul_(g, g, value=1.0 / n_total)
            p.grad = None
        return hook

    handles = [params[n].register_post_accumulate_grad_hook(hook_for(n)) for n in by_param]
    was_training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpointing is active in training mode only
    dev = model.get_input_embeddings().weight.device
    batches = ids.split(bs)
    mine = distributed.my_batches(len(batches))
    if progress:
        from tqdm import tqdm

        mine = tqdm(mine, desc=f"gradients ({mode})")
    try:
        for i in mine:
            batch = batches[i]
            scale["w"] = batch.shape[0] / n_total
            gen = torch.Generator().manual_seed(i)  # the encoder objective's corruption of batch i, on any rank
            loss = objective(model, batch.to(dev), gen)
            loss.backward()
            stats.loss += float(loss.detach()) * scale["w"]
            stats.n_samples += batch.shape[0]
        _fill_unreached(stats, by_param, params)
        if distributed.is_split(len(batches)):
            _reduce(stats)
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return stats


def _reduce(stats: GradientStats) -> None:
    """Sum every rank's share of ``stats`` (the same keys on every rank, after :func:`_fill_unreached`)."""
    parts = stats.wg if stats.mode == "vector" else {**{("g", k): v for k, v in stats.grad.items()},
                                                      **{("f", k): v for k, v in stats.fisher.items()}}
    distributed.all_reduce_sum_([parts[k] for k in sorted(parts)])
    stats.loss, n = distributed.all_reduce_floats([stats.loss, stats.n_samples])
    stats.n_samples = int(n)
