"""The transform of ``shear prune``: score -> plan -> slice (+ bias compensation), in place, no I/O.

``prune_to_target_(model, cfg, icfg, ids)`` reaches ``cfg.target`` in ``cfg.iterative_steps`` steps:
step ``k`` rescores the model left by step ``k-1`` and prunes it to ``P0 - (P0 - P_target) * k / K``
parameters. FLAP bias compensation (``shear.importance.compensation``) is planned with each step's
plan (its added parameters count against the target) and written after the slicing; the analyzer
lists the new biases as group members, so later steps slice them. An estimator with a
``reconstruct`` hook (``obs``) updates the kept weights between planning and slicing; with
compensation on (its default too) the biases go where compensation would put them, but with the
values the hook refits instead of FLAP's means. Calibration sampling, reports,
plots and export live in ``shear.prune.pipeline``.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import torch

from shear.analyze import analyze
from shear.analyze.families import family_of
from shear.analyze.graph import HEAD_KINDS, PrunePlan, StructureGraph
from shear.importance import ESTIMATORS, SELF_STANDARDIZED, STANDARDIZED, score
from shear.importance.compensation import BiasPlan, apply_biases_, compensation_biases, flag_zero_biases, plan_biases
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.plan import STRUCTURE_KINDS, ParamCounter, build_plan, model_shapes

log = logging.getLogger("shear")


@dataclass
class PruneResult:
    """What :func:`prune_to_target_` did: one plan per step, compensation, seconds per phase."""

    plans: list[PrunePlan] = field(default_factory=list)
    compensate: bool = False
    flags: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    zero_biases: dict[str, int] = field(default_factory=dict)  # zero bias entries the flags brought, by projection
    time_s: dict = field(default_factory=lambda: {"scoring": 0.0, "planning": 0.0, "reconstruction": 0.0,
                                                  "slicing": 0.0})

    @property
    def zero_bias_params(self) -> int:
        """Zero-valued bias parameters the compensation's config flags added (counted in the target)."""
        return sum(self.zero_biases.values())


def kinds_needed(cfg: PruneConfig) -> set[str]:
    """Group kinds the plan may shrink (structures, fixed ratios, target-shape fields)."""
    structures = set(cfg.structures) | set(cfg.structure_ratios)
    s = cfg.target.shape
    if s is not None:
        structures = set()
        structures |= {"hidden"} if s.hidden_size else set()
        structures |= {"mlp"} if s.intermediate_size else set()
        structures |= {"heads"} if (s.num_attention_heads or s.num_key_value_heads) else set()
        structures |= {"layers"} if s.num_hidden_layers else set()
    return {k for st in structures for k in STRUCTURE_KINDS[st]}




def stays_stock(model, graph: StructureGraph, plan: PrunePlan, stock_now: bool | None = None) -> bool:
    """Whether ``model`` exports as its stock class now and still will after ``plan`` (same widths in
    every surviving layer, no dropped sublayer). Conservative: True may still export per-layer (e.g. a
    hidden size the stock config rejects), which only means fewer bias slots are used.
    ``stock_now``: whether the model is stock before the plan, if the caller already knows."""
    if stock_now is None:
        from shear.prune.export import layout_of

        stock_now = not layout_of(model)
    if not stock_now:
        return False
    dead = {g.layer for g in graph.by_kind("layer") if plan.remove.get(g.name)}
    for kinds in (HEAD_KINDS, ("mlp_channel",)):
        kept = {g.num_units - len(plan.remove.get(g.name, [])) for g in graph.groups
                if g.kind in kinds and g.layer not in dead}
        if len(kept) > 1:
            return False
    return not any(plan.remove.get(g.name) for g in graph.groups if g.kind in ("attn_sublayer", "mlp_sublayer"))


def plan_with_biases(model, graph, scores, cfg, ctx, tp, fam, placement_only: bool = False
                     ) -> tuple[PrunePlan, BiasPlan]:
    """The plan and its compensation biases; with a parameter target the biases' parameters count
    (re-planned for a budget lowered by them until plan + biases fit). ``placement_only``: where the biases
    go, with zero values (a streamed run computes the values block by block)."""
    shapes = model_shapes(model)
    plan = build_plan(graph, scores, cfg, shapes, target_params=tp)
    counter = ParamCounter(graph, shapes)
    from shear.prune.export import layout_of

    stock_now = not layout_of(model)  # once: re-planning changes the plan, not the model
    refit = ESTIMATORS[cfg_estimator(ctx)].reconstruct is not None  # values come from the refit: placement only
    for _ in range(6):
        biases = compensation_biases(model, plan, graph, None if (refit or placement_only) else ctx.activations())
        dead = {g.module for g in graph.by_kind("layer") if plan.remove.get(g.name)}
        bp = plan_biases(model, fam, graph, biases, stays_stock(model, graph, plan, stock_now), dead)
        if tp is None:
            return plan, bp
        removed = {k: len(v) for k, v in plan.remove.items()}
        extra = bp.added_params(counter, removed)
        if counter.count(removed) + extra <= tp:
            return plan, bp
        plan = build_plan(graph, scores, cfg, shapes, target_params=tp - extra)
    raise ValueError(f"prune.target: {tp} parameters cannot be met with bias compensation's added biases; "
                     "set importance.bias_compensation=false")


def cfg_estimator(ctx) -> str:
    return getattr(ctx.cfg, "estimator", "")


def check_settings(cfg: PruneConfig, icfg: ImportanceConfig) -> None:
    """Settings that cannot be honoured together are errors before any work."""
    std = icfg.standardize if icfg.standardize is not None else icfg.estimator in STANDARDIZED
    if cfg.allocation == "pool" and not std and icfg.estimator not in SELF_STANDARDIZED:
        raise ValueError("prune.allocation=pool ranks heads against MLP channels, so their scores must share a scale: "
                         f"set importance.standardize=true (estimator {icfg.estimator!r} is not standardized by default)")


def final_params(model, graph: StructureGraph, cfg: PruneConfig) -> int | None:
    """The parameter count ``cfg.target`` asks for (None: a target shape)."""
    if cfg.target.shape is not None:
        return None
    if cfg.target.ratio is not None:
        return int(ParamCounter(graph, model_shapes(model)).count({}) * (1 - cfg.target.ratio))
    return cfg.target.params


def compensates(model, icfg: ImportanceConfig, fam) -> bool:
    """Whether removed units leave bias compensation behind: ``importance.bias_compensation``, by default on for
    FLAP and refitting estimators (OBS); off, with a warning, for a model without a family (no known slots)."""
    on = icfg.bias_compensation if icfg.bias_compensation is not None else (
        icfg.estimator in ("flap", "flap_original") or ESTIMATORS[icfg.estimator].reconstruct is not None)
    if on and fam is None:
        log.warning("bias compensation skipped: %s is not a supported family, so where biases can live is "
                    "unknown", type(model).__name__)
        return False
    return on


def prune_to_target_(model, cfg: PruneConfig, icfg: ImportanceConfig, ids: torch.Tensor | None) -> PruneResult:
    """Prune ``model`` in place to ``cfg.target`` (see the module docstring); ``ids``: calibration ``[n, L]``."""
    from shear.prune.slice import prune_

    check_settings(cfg, icfg)
    kinds = kinds_needed(cfg)
    res = PruneResult()
    graph = analyze(model, heads=cfg.heads)
    p0 = graph.total_params
    final = final_params(model, graph, cfg)
    steps = cfg.iterative_steps if cfg.target.shape is None else 1
    reconstruct = ESTIMATORS[icfg.estimator].reconstruct
    fam = family_of(model)
    res.compensate = compensate = compensates(model, icfg, fam)
    t = res.time_s
    for k in range(1, steps + 1):
        if k > 1:
            graph = analyze(model, heads=cfg.heads)
        ts = time.time()
        scores, ctx = score(model, graph, icfg, ids, kinds=kinds)
        t["scoring"] += time.time() - ts
        ts = time.time()
        tp = None if cfg.target.shape is not None else int(p0 - (p0 - final) * k / steps)
        if compensate:
            plan, bp = plan_with_biases(model, graph, scores, cfg, ctx, tp, fam)
        else:
            plan, bp = build_plan(graph, scores, cfg, model_shapes(model), target_params=tp), BiasPlan()
        t["planning"] += time.time() - ts
        if reconstruct is not None:  # e.g. OBS: refit the kept weights (and biases), in the unsliced numbering
            ts = time.time()
            mods = {n for n, b in bp.add.items() if b is not None}
            fitted = reconstruct(model, plan, graph, ctx, new_biases=mods)
            # the refit replaces FLAP's values; biases that already existed were refitted in place
            bp.add = {n: fitted.get(n) for n, b in bp.add.items() if b is None or n in fitted}
            t["reconstruction"] += time.time() - ts
        ts = time.time()
        prune_(model, plan, graph)
        bp.add = _renumber(bp.add, plan, graph)
        apply_biases_(model, bp)
        res.flags = sorted(set(res.flags) | set(bp.flags))
        res.compensated += [n for n, b in bp.add.items() if b is not None]
        res.skipped += bp.skipped
        warn_skipped(bp, fam)
        t["slicing"] += time.time() - ts
        res.plans.append(plan)
        log.info("prune step %d/%d: %s", k, steps, {kk: len(v) for kk, v in plan.remove.items()})
        del ctx, scores
    if res.flags:
        res.zero_biases = flag_zero_biases(model, fam, graph.meta.get("layers", ""), res.flags)
        warn_zero_biases(res, fam)
    return res


def warn_skipped(bp: BiasPlan, fam) -> None:
    """Say which compensation biases a stock export had no slot for (none is written where it would not load)."""
    if bp.skipped:
        log.warning("bias compensation skipped for %d projection(s) (e.g. %s): the stock %s class has no "
                    "bias there and this uniform plan exports as the stock class; a global (per-layer) plan "
                    "keeps them", len(bp.skipped), bp.skipped[0], fam.name)


def warn_zero_biases(res: PruneResult, fam) -> None:
    """Say how many zero-valued bias parameters the compensation's config flags brought along."""
    if res.zero_biases:
        log.warning("bias compensation set %s: the stock %s class then builds a bias on every projection the "
                    "flag covers, so the model holds %d zero-valued bias parameters (%s); a ratio or params "
                    "target counts them", "/".join(res.flags), fam.name, res.zero_bias_params,
                    ", ".join(f"{k} {v}" for k, v in res.zero_biases.items()))


def _renumber(biases: dict, plan: PrunePlan, graph: StructureGraph) -> dict:
    """Module names after removed layers are deleted and the rest renumbered."""
    gone = sorted(int(k.split(".")[1]) for k, v in plan.remove.items() if k.endswith(".layer") and v)
    if not gone:
        return biases
    prefix = re.escape(graph.meta.get("layers", "model.layers"))
    out = {}
    for name, b in biases.items():
        m = re.match(rf"^({prefix})\.(\d+)\.(.*)$", name)
        if m is None:
            out[name] = b
            continue
        i = int(m.group(2))
        out[f"{m.group(1)}.{i - sum(j < i for j in gone)}.{m.group(3)}"] = b
    return out
