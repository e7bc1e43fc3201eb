"""Target shapes and the Lagrangian expected-size constraint (Sheared-LLaMA, FIELD-NOTES §4).

A target is the number of units kept per row of each mask type: ``layers`` (blocks), ``heads`` (head
units per layer, in the graph's unit: KV groups, heads, or query heads per KV group), ``mlp``
(channels per layer), ``hidden`` (residual channels). It comes from an explicit shape, a parameter
ratio, or another model's ``config.json`` (``shape_from``).

Constraint per mask type, with ŝ_r = expected kept fraction of row r (a layer's heads or MLP channels;
the hidden channels; the layers) and t(step) ramped linearly from 1 to the target fraction over the
warm-up:  L = mean_r(λ₁·(ŝ_r − t) + λ₂·(ŝ_r − t)²)  (``per_row``, LLM-Shearing), or one gap of the
rows' mean per type.  λ is maximised (gradient ascent), so it grows until the expected size meets the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shear.analyze.graph import StructureGraph
from shear.shearing.masks import MASK_TYPES


@dataclass
class TargetShape:
    """Units kept per row of each mask type; None keeps the type whole (no mask is learned for it).

    Attributes:
        layers: decoder blocks kept.
        heads: head units kept per layer (graph units: KV groups / heads / query heads per KV group).
        mlp: MLP channels kept per layer.
        hidden: residual channels kept.
    """

    layers: int | None = None
    heads: int | None = None
    mlp: int | None = None
    hidden: int | None = None

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v is not None}


def full_shape(graph: StructureGraph) -> dict[str, int]:
    """Units per row of every mask type in the unpruned model."""
    out = {}
    for t, kinds in MASK_TYPES.items():
        gs = [g for g in graph.groups if g.kind in kinds]
        if gs:
            out[t] = len(gs) if t == "layers" else gs[0].num_units
    return out


def _rows(graph: StructureGraph, t: str) -> list:
    return [g for g in graph.groups if g.kind in MASK_TYPES[t]]


def count_params(graph: StructureGraph, shapes: dict, shape: dict[str, int]) -> int:
    """Exact parameter count after pruning every row of each type to ``shape`` (last blocks dropped
    for ``layers``; which blocks go does not change the count of a uniform model)."""
    from shear.prune.plan import ParamCounter

    full, removed = full_shape(graph), {}
    for t, keep in shape.items():
        gs = _rows(graph, t)
        if t == "layers":
            removed.update({g.name: 1 for g in gs[keep:]})
        else:
            removed.update({g.name: full[t] - keep for g in gs})
    return ParamCounter(graph, shapes).count(removed)


CONFIG_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")


def shape_from_keys(cfg: dict, graph: StructureGraph) -> TargetShape:
    """A target in config keys (``prune.target.shape``'s: ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``, ``num_hidden_layers``) -> mask-type units.
    Unset keys keep the current size; other keys (a whole config.json) are ignored."""
    kind, meta = next(((g.kind, g.meta) for g in graph.groups if g.kind in MASK_TYPES["heads"]), (None, {}))
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if kind == "kv_group":
        head_units = kv if kv is not None else (heads // meta["query_heads_per_unit"] if heads else None)
    elif kind == "query_head":
        if kv is not None and kv != meta["kv_heads"]:
            raise ValueError(f"shearing.target.num_key_value_heads: heads='query_head' keeps every KV head "
                             f"({meta['kv_heads']}); use heads='kv_group'")
        head_units = heads // meta["kv_heads"] if heads else None
    else:
        head_units = heads
    return TargetShape(layers=cfg.get("num_hidden_layers"), heads=head_units,
                       mlp=cfg.get("intermediate_size"), hidden=cfg.get("hidden_size"))


def shape_from_config(path: str | Path, graph: StructureGraph) -> TargetShape:
    """The shape of another model of the same family from its ``config.json`` (e.g. a smaller sibling)."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.exists():
        raise ValueError(f"shearing.target.shape_from: {p} does not exist")
    from shear.models import read_json

    return shape_from_keys(read_json(p), graph)


def query_heads(graph: StructureGraph, head_units: int) -> int:
    """Query heads per layer when every layer keeps ``head_units`` head units."""
    g = next((g for g in graph.groups if g.kind in MASK_TYPES["heads"]), None)
    if g is None:
        return 0
    if g.kind == "kv_group":
        return head_units * g.meta["query_heads_per_unit"]
    if g.kind == "query_head":
        return head_units * g.meta["kv_heads"]
    return head_units


def _hidden_per_head(graph: StructureGraph) -> bool:
    from shear.analyze.families import FAMILIES

    fam = FAMILIES.get(graph.family)
    return bool(fam is not None and fam.hidden_per_head)


def check_stock(graph: StructureGraph, shape: dict[str, int]) -> None:
    """Families whose stock config needs hidden % query heads == 0 (Llama, Gemma2): refuse a target that
    breaks it (the learned model would not load as the stock class)."""
    full = full_shape(graph)
    if not _hidden_per_head(graph) or "heads" not in full:
        return
    hidden, heads = shape.get("hidden", full.get("hidden")), query_heads(graph, shape.get("heads", full["heads"]))
    if hidden and heads and hidden % heads:
        raise ValueError(f"shearing.target: hidden size {hidden} is not a multiple of the {heads} query heads; "
                         f"the stock {graph.family} config needs it")


def shape_from_ratio(ratio: float, graph: StructureGraph, shapes: dict,
                     types: tuple[str, ...] = ("heads", "mlp", "hidden"), round_to: int = 1) -> TargetShape:
    """The widest uniform shape that removes at least ``ratio`` of the parameters (as
    ``prune.target.ratio``): one keep fraction f for all ``types`` (bisection on f, counts exact),
    rounded down to whole units (at least 1 per row); MLP and hidden widths to multiples of
    ``round_to`` (where the full width allows), hidden also to the query-head count where the family's
    stock config needs it."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"shearing.target.ratio: must be in (0, 1), got {ratio}")
    full = full_shape(graph)
    budget = (1.0 - ratio) * count_params(graph, shapes, {})

    def down(n: int, step: int) -> int:
        return max(step, n // step * step) if step <= n else max(1, n)

    def shape(f: float) -> dict[str, int]:
        out = {t: max(1, int(f * full[t])) for t in types if t in full}
        if "mlp" in out:
            out["mlp"] = down(out["mlp"], min(round_to, full["mlp"]))
        if "hidden" in out:
            step = round_to
            if _hidden_per_head(graph) and "heads" in full:
                step = math.lcm(step, query_heads(graph, out.get("heads", full["heads"])))
            out["hidden"] = down(out["hidden"], step)
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_params(graph, shapes, shape(mid)) <= budget else (lo, mid)
    if count_params(graph, shapes, shape(lo)) > budget:
        raise ValueError(f"shearing.target.ratio: no uniform shape of {list(types)} removes {ratio} of the parameters")
    return TargetShape(**shape(lo))


def resolve_target(graph: StructureGraph, shapes: dict, shape: dict | None = None, ratio: float | None = None,
                   shape_from: str | None = None, types: tuple[str, ...] = ("heads", "mlp", "hidden"),
                   round_to: int = 1) -> dict[str, int]:
    """Exactly one of ``shape`` / ``ratio`` / ``shape_from`` -> ``{type: kept units per row}``,
    with types equal to the full model dropped. Raises ValueError naming the key.

    ``shape``: config keys (:data:`CONFIG_KEYS`, as ``prune.target.shape``); ``ratio``: fraction of the
    parameters to REMOVE (as ``prune.target.ratio``), spread over ``types`` with ``round_to``;
    ``shape_from``: a config.json or its directory."""
    given = [k for k, v in (("shape", shape), ("ratio", ratio), ("shape_from", shape_from)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"shearing.target: give exactly one of shape, ratio, shape_from (got {given})")
    if shape is not None:
        unknown = set(shape) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"shearing.target.shape: unknown keys {sorted(unknown)} (expected {list(CONFIG_KEYS)})")
        t = shape_from_keys(shape, graph)
    elif ratio is not None:
        t = shape_from_ratio(ratio, graph, shapes, types, round_to)
    else:
        t = shape_from_config(shape_from, graph)
    full, out = full_shape(graph), {}
    for k, v in t.as_dict().items():
        if k not in full:
            raise ValueError(f"shearing.target.{k}: the model has no {k} groups")
        if not 1 <= v <= full[k]:
            raise ValueError(f"shearing.target.{k}: {v} is not in [1, {full[k]}]")
        if v < full[k]:
            out[k] = v
    check_stock(graph, out)
    return out


class Lagrangian(nn.Module):
    """λ₁, λ₂ per mask type; ``forward(expected, step)`` -> (loss term, {type: (ŝ, t)}).

    ``expected[type]`` is the expected kept units of each row ``[rows]``. ``per_row=True`` (LLM-Shearing's
    ``lagrangian_regularization`` with a target model: one λ pair per type, the gap of every row):
    ``L_type = mean_r(λ₁·(ŝ_r − t) + λ₂·(ŝ_r − t)²)``, so each layer's heads / MLP channels are held to the
    per-layer target and the final per-row top-k keeps what was learned. ``per_row=False``: one gap per
    type, ŝ = the mean of the rows (only the type's total is constrained; rows may drift apart).
    The reported ŝ is the mean over rows either way.
    """

    def __init__(self, full: dict[str, int], target: dict[str, int], rows: dict[str, int], warmup: int,
                 per_row: bool = True):
        super().__init__()
        self.full, self.target, self.rows, self.warmup = full, target, rows, max(1, warmup)
        self.per_row = per_row
        self.lambdas = nn.ParameterDict({t: nn.Parameter(torch.zeros(2)) for t in target})

    def target_fraction(self, t: str, step: int) -> float:
        goal = self.target[t] / self.full[t]
        return 1.0 + (goal - 1.0) * min(1.0, step / self.warmup)

    def forward(self, expected: dict[str, torch.Tensor], step: int):
        loss, report = 0.0, {}
        for t, lam in self.lambdas.items():
            s_rows = expected[t].reshape(-1) / self.full[t]
            goal = self.target_fraction(t, step)
            gap = (s_rows if self.per_row else s_rows.mean()) - goal
            loss = loss + (lam[0] * gap + lam[1] * gap * gap).mean()
            report[t] = (float(s_rows.detach().mean()), goal)
        return loss, report
