"""Finish learned masks: exact top-k per row, mask values folded into weights, then the slicer.

After :func:`fix_masks` every row of every mask type keeps exactly the target number of units
(top-k by log α), so the model is uniform and exports as the stock class. Kept head / MLP units and
kept layers keep their deterministic mask value, folded into the weights they scale (o_proj /
down_proj input columns; the block's residual writers, bias included); hidden channels are binary
(a fractional value would not fold exactly into tied embeddings). :func:`finish_` then removes the
hooks and slices the zeroed units with :func:`shear.prune.slice.prune_`, so the pruned model's logits
equal the masked model's in eval mode. With ``hidden_norm="kept"`` the masked RMSNorms already divide
by the k kept channels, so the slicer's sqrt(d / k) weight and d / k ε corrections (made for norms over
all d channels) are undone: the sliced norms keep their own weights and ε.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from shear.analyze.families import FAMILIES
from shear.analyze.graph import PrunePlan
from shear.prune.slice import prune_
from shear.shearing.masks import ShearMasks, _unit_scale
from shear.shearing.target import full_shape


def fix_masks(masks: ShearMasks, target: dict[str, int]) -> dict[str, torch.Tensor]:
    """Fix every mask to its top-k (k = target, or all units for types without a target).

    Returns ``{type: bool keep [rows, n]}``.
    """
    full = full_shape(masks.graph)
    masks.constrain_()
    return {t: m.fix(target.get(t, full[t]), binary=(t == "hidden")) for t, m in masks.masks.items()}


def _scale_(p: torch.Tensor, dim: int, scale: torch.Tensor) -> None:
    shape = [1] * p.dim()
    shape[dim] = -1
    p.mul_(scale.view(shape).to(p.dtype))


def fold_plan(model: nn.Module, masks: ShearMasks, keep: dict[str, torch.Tensor]) -> PrunePlan:
    """Fold the fixed mask values into ``model``'s weights; return the plan of the zeroed units."""
    params = dict(model.named_parameters())
    plan = PrunePlan(meta={"method": "shearing"})
    gone_layers = set()
    if "layers" in masks.masks:
        z = masks.masks["layers"].fixed[0]
        for col, g in enumerate(masks.groups["layers"]):
            if not keep["layers"][0, col]:
                plan.remove[g.name] = [0]
                gone_layers.add(g.layer)
                continue
            for p in g.meta["outputs"]:
                params[p].mul_(z[col].to(params[p].dtype))
    for t in ("heads", "mlp"):
        if t not in masks.masks:
            continue
        z = masks.masks[t].fixed
        for row, g in enumerate(masks.groups[t]):
            if g.layer in gone_layers:
                continue
            m = next(m for m in g.members if m.role == "in")
            _scale_(params[m.param], m.dim, _unit_scale(m.units, z[row], params[m.param].shape[m.dim]))
            dropped = (~keep[t][row]).nonzero().flatten().tolist()
            if dropped:
                plan.remove[g.name] = dropped
    if "hidden" in masks.masks:
        dropped = (~keep["hidden"][0]).nonzero().flatten().tolist()
        if dropped:
            plan.remove["hidden"] = dropped
    return plan


def _norm_state(model: nn.Module, masks: ShearMasks) -> tuple[list, list, float | None]:
    """Before slicing (blocks are renumbered after): the hidden norm modules, every RMSNorm's ε, config ε."""
    names = dict.fromkeys(m.param.rpartition(".")[0] for m in masks.groups["hidden"][0].members if m.role == "norm")
    eps = [(mod, a, getattr(mod, a)) for mod in model.modules() if type(mod).__name__.endswith("RMSNorm")
           for a in ("variance_epsilon", "eps") if isinstance(getattr(mod, a, None), float)]
    return [model.get_submodule(n) for n in names], eps, getattr(model.config, "rms_norm_eps", None)


def _undo_norm_correction(model: nn.Module, masks: ShearMasks, state: tuple, d: int, k: int) -> None:
    """The slicer scaled hidden RMSNorm weights by sqrt(d / k) (Gemma: 1 + w) and every RMSNorm ε by
    d / k; with statistics over the kept channels the masked model had neither: divide and restore."""
    norms, eps, config_eps = state
    c = math.sqrt(d / k)
    rms1p = FAMILIES[masks.graph.family].norm == "rms1p"
    with torch.no_grad():
        for mod in norms:
            w = mod.weight
            w.copy_((1 + w) / c - 1) if rms1p else w.div_(c)
    for mod, a, v in eps:
        setattr(mod, a, v)
    if config_eps is not None:
        model.config.rms_norm_eps = config_eps


def finish_(model: nn.Module, masks: ShearMasks, target: dict[str, int]) -> PrunePlan:
    """Fix the masks to ``target``, fold them, detach the hooks and slice ``model`` in place.

    Returns the plan that was applied (unit numbers of the model before slicing).
    """
    keep = fix_masks(masks, target)
    with torch.no_grad():
        plan = fold_plan(model, masks, keep)
    masks.remove()
    undo = "hidden" in plan.remove and masks.hidden_norm == "kept"
    state = _norm_state(model, masks) if undo else None
    prune_(model, plan, masks.graph)
    if undo:
        d = masks.graph["hidden"].num_units
        _undo_norm_correction(model, masks, state, d, d - len(plan.remove["hidden"]))
    return plan
