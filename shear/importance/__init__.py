"""Importance estimation: score the groups of a StructureGraph with a registered estimator.

    from shear.importance import score
    scores, ctx = score(model, graph, ImportanceConfig(estimator="flap"), ids)   # {group: [units]}

Width groups are scored by ``cfg.estimator``; layer kinds by ``cfg.layer_estimator`` (or the
width estimator when that is None). Statistics (activations, gradients) are computed once per
call and kept in the returned context (FLAP's bias compensation reuses them).
"""
from __future__ import annotations

import torch

from shear.analyze.graph import DEPTH_KINDS, StructureGraph
from shear.importance import criteria
from shear.importance.estimators import ESTIMATORS, Estimator, ScoringContext, Scores, register
from shear.importance import obs_hooks  # noqa: E402,F401  (registers "obs")

__all__ = ["SELF_STANDARDIZED", "score_modules", "standardize_scores", "ESTIMATORS", "Estimator", "ScoringContext", "Scores", "register", "score", "criteria", "needs_data"]

#: estimators whose scores are standardized across layers by default (FLAP).
STANDARDIZED = {"flap"}
#: estimators whose scores come standardized (within each layer) already: pool-able, never re-standardized.
SELF_STANDARDIZED = {"flap_original"}


def needs_data(cfg, kinds: set[str] | None = None) -> bool:
    """Whether scoring with ``cfg`` needs calibration ids."""
    names = [cfg.estimator]
    if kinds is None or kinds & set(DEPTH_KINDS):
        names.append(cfg.layer_estimator or cfg.estimator)
    return any(ESTIMATORS[n].needs in ("activations", "gradients") for n in names)


def score(model, graph: StructureGraph, cfg, ids: torch.Tensor | None = None, kinds: set[str] | None = None,
          ctx: ScoringContext | None = None) -> tuple[Scores, ScoringContext]:
    """Score every group of ``graph`` whose kind is in ``kinds`` (None = all).

    Returns ``({group name: FloatTensor[num_units]}, context)``; higher = more important.
    """
    groups = [g for g in graph.groups if kinds is None or g.kind in kinds]
    if ctx is None:
        ctx = ScoringContext(model, graph, cfg, ids)
        if kinds is not None:  # record only the inputs these groups read (their input-column members)
            ctx.modules = score_modules(groups)
    width = [g for g in groups if g.kind not in DEPTH_KINDS]
    depth = [g for g in groups if g.kind in DEPTH_KINDS]
    out: Scores = {}
    for est_name, gs in ((cfg.estimator, width), (cfg.layer_estimator or cfg.estimator, depth)):
        if not gs:
            continue
        est = ESTIMATORS[est_name]
        bad = sorted({g.kind for g in gs} - set(est.kinds))
        if bad:
            raise ValueError(f"importance: estimator {est_name!r} cannot score kinds {bad}; it scores {list(est.kinds)}")
        out.update(est.fn(ctx, gs))
    return standardize_scores(out, width, cfg), ctx


def score_modules(groups) -> set[str]:
    """The Linear modules whose inputs scoring ``groups`` reads (their input-column members)."""
    return {m.param[: -len(".weight")] for g in groups for m in g.members
            if m.role == "in" and m.param.endswith(".weight")}


def standardize_scores(out: Scores, width, cfg) -> Scores:
    """``out`` with each width kind's scores standardized across layers, when ``cfg`` asks (FLAP by default)."""
    std = cfg.standardize if cfg.standardize is not None else cfg.estimator in STANDARDIZED
    if std:
        for kind in {g.kind for g in width}:
            names = [g.name for g in width if g.kind == kind]
            for n, s in zip(names, criteria.standardize([out[n] for n in names])):
                out[n] = s
    return out
