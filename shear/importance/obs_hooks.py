"""The ``obs`` estimator (glue): Hessians of consumer inputs streamed block by block, scores, and the
layer-sequential reconstruction that the prune transform calls between planning and slicing.

Math in :mod:`shear.importance.obs`. Two passes over the calibration ids, each holding one block's
inputs for the calibration set plus that block's Hessians (``[in, in]`` fp32 per consumer); the work on
one block is :func:`score_block` / :func:`refit_block`, which the streamed prune (``shear.prune.stream``)
calls on blocks read from the shards one at a time:

1. **score** (``obs`` registered below): the unpruned model; the units of each consumer (o_proj for
   heads / KV groups / query heads, down_proj or fc2 for MLP channels; GPT-2's Conv1D weights are
   ``[in, out]``) are ordered by ZipLM's greedy OBS loop (:func:`~shear.importance.obs.greedy_scores`:
   remove the cheapest, update W and H⁻¹, repeat) and scored by the marginal ``ΔE`` along that order.
   The planner ranks these like any other score (uniform / global / pool, round_to, protection:
   unchanged); within a layer its "n lowest" are the greedy first n. ``ΔE`` is a squared error of the
   consumer's output per token, so units of different layers share a scale without standardization.
2. **reconstruct** (:func:`reconstruct_`, after the plan): block ``i`` is calibrated on the outputs of
   blocks ``0..i-1`` already pruned and reconstructed (SparseGPT / ZipLM's sequential order; inside a
   block the attention consumer is done before the MLP's, whose input then already reflects it). The
   plan's units of each consumer are removed at once with the OBS update (``W_S`` becomes 0, so the
   block computes what the sliced block will); slicing afterwards drops the zero columns. Removed
   layers are skipped and removed sublayers' outputs zeroed, as slicing will do.

Bias: OBS replaces FLAP's bias compensation by refitting a bias jointly with the kept columns (a
constant input column in H; FLAP's ``b = W_S·mean(X_S)`` is one point of what the refit minimises
over, so the layer error is never above FLAP's). A consumer that has a bias (GPT-2, OPT, BERT) refits
it in place. One that has none gets a new bias only where FLAP's compensation could put one: the
transform decides where with the compensation's own placement and parameter accounting
(``shear.importance.compensation.plan_biases``; ``importance.bias_compensation=false`` turns new
biases off) and writes the refitted values after slicing; FLAP's mean biases are never added on
top. Scores assume the bias column whenever new biases are allowed.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from shear.analyze.graph import DEPTH_KINDS, HEAD_KINDS, Group, PrunePlan, StructureGraph
from shear.importance import criteria as C
from shear.importance import obs as O
from shear.importance.calibrate import _device, _to, capture_block_inputs, decoder_layers
from shear.importance.estimators import ScoringContext, Scores, register
from shear.progress import progress

log = logging.getLogger("shear")

OBS_KINDS = ("head", "kv_group", "query_head", "mlp_channel")


class _Stop(Exception):
    pass


def consumers_of(groups: list[Group]) -> dict[int, dict[str, list[tuple[Group, int]]]]:
    """``{layer: {consumer module name: [(group, member index)]}}``: members indexing input columns,
    attention consumers first (forward order)."""
    out: dict[int, dict[str, list]] = {}
    for g in sorted(groups, key=lambda g: (g.layer, g.kind not in HEAD_KINDS)):
        for j, m in enumerate(g.members):
            if m.role == "in" and m.param.endswith(".weight"):
                out.setdefault(g.layer, {}).setdefault(m.param[: -len(".weight")], []).append((g, j))
    return out


def _has_bias(mod: nn.Module) -> bool:
    return getattr(mod, "bias", None) is not None


def _weight(mod: nn.Module, bias_col: bool) -> torch.Tensor:
    """The consumer's weight as ``[out, in]`` fp32; with ``bias_col`` its bias (or zeros) as a last column."""
    w = mod.weight.detach().float()
    w = w.t() if type(mod).__name__ == "Conv1D" else w
    if bias_col:
        b = mod.bias.detach().float() if _has_bias(mod) else torch.zeros(w.shape[0], device=w.device)
        w = torch.cat([w, b.unsqueeze(1)], 1)
    return w


def _set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_(w[:, -1].to(mod.bias.dtype))
            w = w[:, :-1]
        mod.weight.copy_((w.t() if type(mod).__name__ == "Conv1D" else w).to(mod.weight.dtype))


@torch.no_grad()
def _run_block(layer, hidden, kws, mods: dict[str, nn.Module], stop: bool, bias_cols: set[str] = frozenset()):
    """Run ``layer`` on every batch with hooks folding each module's input into its Hessian (with a
    constant-1 column for modules that have a bias or are named in ``bias_cols``).

    Returns ``({module: H}, outputs)``; with ``stop`` each batch is aborted as soon as every hooked
    module has seen its input (outputs None: only the Hessians are wanted).
    """
    dev = _device(layer)
    hs: dict[str, torch.Tensor | None] = {n: None for n in mods}
    counts, seen = {n: 0 for n in mods}, set()

    def hook(name, mod):
        bias = _has_bias(mod) or name in bias_cols

        def fn(_m, inp, _out):
            x = inp[0]
            if hs[name] is None:
                d = x.shape[-1] + int(bias)
                hs[name] = torch.zeros(d, d, dtype=torch.float32, device=x.device)
            counts[name] = O.add_to_hessian(hs[name], counts[name], x, bias)
            seen.add(name)
            if stop and len(seen) == len(mods):
                raise _Stop
        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in mods.items()]
    outs = []
    try:
        for b in range(len(hidden)):
            args, kw = kws[b]
            seen.clear()
            try:
                out = layer(hidden[b].to(dev), *_to(args, dev), **_to(kw, dev))
            except _Stop:
                continue
            outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, h in hs.items() if h is None]
    if missing:
        raise ValueError(f"obs: {missing} saw no input while their block ran (no Hessian)")
    return hs, (None if stop else outs)


def refit_consumers(graph: StructureGraph, plan: PrunePlan) -> dict[int, dict[str, list[tuple[Group, int]]]]:
    """:func:`consumers_of` of the groups the refit reconstructs (OBS kinds that ``plan`` cuts), by block."""
    return consumers_of([g for g in graph.groups if g.kind in OBS_KINDS and plan.remove.get(g.name)])


def new_bias_modules(model: nn.Module, cons: dict, new_biases: set[str]) -> set[str]:
    """The consumers of ``cons`` that get a new bias from the refit: named in ``new_biases``, without one yet
    (``model`` may be a meta skeleton: only which biases exist is read)."""
    return {n for per in cons.values() for n in per if n in new_biases and not _has_bias(model.get_submodule(n))}


@torch.no_grad()
def score_block(model: nn.Module, layer: nn.Module, hidden: list, kws: list, cons: dict, aug: bool,
                pass_on: bool = True) -> tuple[dict[str, list[torch.Tensor]], list | None]:
    """Pass 1 on one block: ``layer`` (its weights dense) run on ``hidden`` (its inputs per batch) with ``kws``
    (its call arguments per batch), each consumer of ``cons`` (``{name: [(group, member index)]}``) folding its
    input into a Hessian (bias column: ``aug`` or an existing bias). Returns ``({group: [greedy scores per
    member]}, the block's outputs per batch)`` (outputs None without ``pass_on``)."""
    mods = {n: model.get_submodule(n) for n in cons}
    if not (mods or pass_on):
        return {}, None
    hs, out = _run_block(layer, hidden, kws, mods, stop=not pass_on, bias_cols=set(mods) if aug else set())
    per: dict[str, list[torch.Tensor]] = {}
    for name, members in cons.items():
        w = _weight(mods[name], aug or _has_bias(mods[name]))
        hinv = O.inverse_hessian(hs[name].to(w.device))
        for g, j in members:
            per.setdefault(g.name, []).append(O.greedy_scores(w, hinv, g.members[j].units))
    return per, out


@torch.no_grad()
def refit_block(model: nn.Module, layer: nn.Module, hidden: list, kws: list, cons: dict, plan: PrunePlan,
                new: set[str], pass_on: bool = True) -> tuple[dict[str, torch.Tensor], list | None]:
    """Pass 2 on one block, in place: each consumer of ``cons`` in order (attention's before the MLP's) gets
    its Hessian on ``hidden`` (the outputs of the blocks before, already refitted) and the OBS update that
    removes the columns ``plan`` cuts; those in ``new`` refit a new bias too, added to their output by a hook
    while the block runs. Returns ``({name in new: bias [out]}, the refitted block's outputs per batch)``
    (outputs None without ``pass_on``); the new biases are not written into the modules."""
    fitted: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, members in cons.items():
            mod = model.get_submodule(name)
            add = name in new
            hs, _ = _run_block(layer, hidden, kws, {name: mod}, stop=True, bias_cols={name} if add else set())
            cols = torch.cat([g.members[j].indices(plan.remove[g.name]) for g, j in members]).unique()
            w = _weight(mod, _has_bias(mod) or add)
            w = O.obs_update(w, O.inverse_hessian(hs[name].to(w.device)), cols)
            if add:
                fitted[name] = w[:, -1].clone()
                handles.append(mod.register_forward_hook(_add_output(fitted[name])))
                w = w[:, :-1]
            _set_weight(mod, w)
        out = _run_block(layer, hidden, kws, {}, stop=False)[1] if pass_on else None
    finally:
        for h in handles:
            h.remove()
    return fitted, out


@torch.no_grad()
def reconstruct_(model: nn.Module, plan: PrunePlan, graph: StructureGraph, ctx: ScoringContext,
                 new_biases: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Pass 2 (module docstring): OBS-reconstruct every consumer that loses columns under ``plan``, in place,
    in the unsliced numbering (:func:`refit_block` per block); the removed columns become 0, existing biases
    are refitted.

    ``new_biases``: consumers without a bias that may get one (their refit includes a bias column).
    Returns ``{module name: bias [out]}`` for those, NOT written into the model (the transform writes
    them after slicing); while a block runs they are added to the module's output by a hook, so later
    blocks see them.
    """
    cons = refit_consumers(graph, plan)
    if not cons:
        return {}
    ctx._need_ids()
    gone_layers, gone_mods = set(), set()
    params = dict(model.named_parameters())
    for g in graph.groups:
        if g.kind in DEPTH_KINDS and plan.remove.get(g.name):
            if g.kind == "layer":
                gone_layers.add(g.layer)
            else:  # the sublayer's residual update becomes 0, as the slicer's Dropped module returns
                gone_mods.update(g.meta.get("modules", []))
                for p in g.meta.get("outputs", []):
                    params[p].zero_()
    new_mods = new_bias_modules(model, cons, new_biases)
    hidden, kws = capture_block_inputs(model, ctx.ids, ctx.cfg.batch_size)
    new: dict[str, torch.Tensor] = {}
    done = 0
    layers = decoder_layers(model)
    for i, layer in progress(enumerate(layers), "obs: refitting blocks", total=len(layers)):
        if i in gone_layers:
            continue
        mine = {n: m for n, m in cons.get(i, {}).items() if not any((n + ".").startswith(g + ".") for g in gone_mods)}
        fitted, hidden = refit_block(model, layer, hidden, kws[i], mine, plan, new_mods, pass_on=i < len(layers) - 1)
        new.update(fitted)
        done += len(mine)
    log.info("obs: reconstructed %d consumer projection(s) layer by layer (%d with a new bias)", done, len(new))
    return {n: b.cpu() for n, b in new.items()}


def _add_output(b: torch.Tensor):
    def hook(_m, _inp, out):
        return out + b.to(out.dtype)
    return hook


@register("obs", "activations", OBS_KINDS,
          "structured OBS (ZipLM): greedy marginal 1/2 tr(W_S ((H^-1)_SS)^-1 W_S^T) on the consumer (o_proj / "
          "down_proj), H = 2XX^T; after planning the kept columns (and a bias where one can live, replacing FLAP's "
          "compensation) are refitted layer-sequentially",
          reconstruct=reconstruct_)
def obs_scores(ctx: ScoringContext, groups: list[Group]) -> Scores:
    """Pass 1 (module docstring): greedy OBS scores on the unpruned model; memory: one block + its Hessians."""
    ctx._need_ids()
    model, cons = ctx.model, consumers_of(groups)
    per: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    hidden, kws = capture_block_inputs(model, ctx.ids, ctx.cfg.batch_size)
    aug = ctx.cfg.bias_compensation is not False  # new biases allowed: score with the bias column
    layers = decoder_layers(model)
    for i, layer in progress(enumerate(layers), "obs: scoring blocks", total=len(layers)):
        got, hidden = score_block(model, layer, hidden, kws[i], cons.get(i, {}), aug, pass_on=i < len(layers) - 1)
        for n, s in got.items():
            per[n] += s
    return aggregate(per, ctx.cfg.aggregation)


def aggregate(per: dict[str, list[torch.Tensor]], how: str) -> Scores:
    """``{group: score [units]}`` from the greedy scores of each group's members (``how``: the aggregation)."""
    empty = [n for n, s in per.items() if not s]
    if empty:
        raise ValueError(f"importance: obs cannot score {empty[:3]}: no consumer (input-column member) in the block")
    return {n: C.aggregate(s, how) for n, s in per.items()}
