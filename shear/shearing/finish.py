"""Finish learned masks: exact top-k per row, mask values folded into weights, then the slicer.

After :func:`fix_masks` every row of every mask type keeps exactly the target number of units
(top-k by log α), so the model is uniform and exports as the stock class. Kept head / MLP units and
kept layers keep their deterministic mask value, folded into the weights they scale (o_proj /
down_proj input columns; the block's residual writers, bias included); hidden channels are binary
(a fractional value would not pass through RMSNorm linearly). :func:`finish_` then removes the hooks
and slices the zeroed units with :func:`shear.prune.slice.prune_`, so the pruned model's logits equal
the masked model's in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn

from shear.analyze.graph import PrunePlan
from shear.prune.slice import prune_
from shear.shearing.masks import ShearMasks, _unit_scale
from shear.shearing.target import full_shape


def fix_masks(masks: ShearMasks, target: dict[str, int]) -> dict[str, torch.Tensor]:
    """Fix every mask to its top-k (k = target, or all units for types without a target).

    Returns ``{type: bool keep [rows, n]}``.
    """
    full = full_shape(masks.graph)
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


def finish_(model: nn.Module, masks: ShearMasks, target: dict[str, int]) -> PrunePlan:
    """Fix the masks to ``target``, fold them, detach the hooks and slice ``model`` in place.

    Returns the plan that was applied (unit numbers of the model before slicing).
    """
    keep = fix_masks(masks, target)
    with torch.no_grad():
        plan = fold_plan(model, masks, keep)
    masks.remove()
    prune_(model, plan, masks.graph)
    return plan
