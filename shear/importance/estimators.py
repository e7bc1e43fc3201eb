"""The estimator registry: name -> function scoring groups of a StructureGraph.

An estimator takes a :class:`ScoringContext` and a list of groups and returns
``{group name: FloatTensor[num_units]}`` (higher = keep). Per-member scores are combined with the
configured aggregation (``sum``/``mean``/``max``/``prod``/``first``). Activation estimators look at
members that index the *input columns* of a Linear (``dim == 1``: o_proj/down_proj for heads and
MLP channels, q/k/v/gate/up/lm_head for hidden channels); other members do not enter them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from shear.analyze.graph import DEPTH_KINDS, HEAD_KINDS, WIDTH_KINDS, Group, Member, StructureGraph
from shear.importance import criteria as C
from shear.importance.calibrate import ActivationStats, collect_activation_stats, layer_scores
from shear.importance.gradients import GradientStats, accumulate_gradients

Scores = dict[str, torch.Tensor]


@dataclass
class Estimator:
    name: str
    fn: Callable[["ScoringContext", list[Group]], Scores]
    needs: str  # "weights" | "activations" | "gradients" | "none"
    kinds: tuple[str, ...]
    description: str
    #: optional ``reconstruct(model, plan, graph, ctx)``: called by the prune transform between planning and
    #: slicing to update the weights that stay (OBS); it replaces bias compensation.
    reconstruct: Callable | None = None


ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, needs: str, kinds: tuple[str, ...], description: str, reconstruct: Callable | None = None):
    """Decorator adding ``fn(ctx, groups) -> Scores`` to :data:`ESTIMATORS` under ``name``."""
    def deco(fn):
        ESTIMATORS[name] = Estimator(name, fn, needs, kinds, description, reconstruct)
        return fn
    return deco


@dataclass
class ScoringContext:
    """Model, graph, config and calibration ids, with statistics computed once and shared.

    ``cfg`` is an ``ImportanceConfig`` (or any object with its fields).
    """

    model: nn.Module
    graph: StructureGraph
    cfg: object
    ids: torch.Tensor | None = None
    act: ActivationStats | None = None
    grads: dict[str, GradientStats] = field(default_factory=dict)
    #: Linear modules whose input statistics are recorded (None = every Linear in the blocks and the head);
    #: :func:`shear.importance.score` narrows it to the consumers of the kinds it scores (FLAP needs o_proj and
    #: down_proj, not the q/k/v/gate/up inputs that hidden channels read).
    modules: set[str] | None = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def activations(self) -> ActivationStats:
        if self.act is None:
            self._need_ids()
            self.act = collect_activation_stats(self.model, self.ids, self.cfg.batch_size, modules=self.modules)
        return self.act

    def gradients(self, mode: str, kinds: set[str]) -> GradientStats:
        if mode not in self.grads:
            self._need_ids()
            self.grads[mode] = accumulate_gradients(self.model, self.ids, self.graph, mode, self.cfg.batch_size,
                                                    kinds=kinds, checkpointing=self.cfg.gradient_checkpointing)
        return self.grads[mode]

    def _need_ids(self) -> None:
        if self.ids is None:
            raise ValueError(f"importance.estimator={self.cfg.estimator!r} needs calibration ids")

    def linear_stats(self, m: Member):
        """The input statistics of the Linear/Conv1D whose input columns ``m`` indexes, or None."""
        if m.role != "in" or not m.param.endswith(".weight"):
            return None
        name = m.param[: -len(".weight")]
        if self.modules is not None and name not in self.modules:
            raise ValueError(f"importance: statistics of {name} were not recorded (kinds scored: see ScoringContext.modules)")
        return self.activations().linears.get(name)

    def weight_out_in(self, m: Member) -> torch.Tensor:
        """The member's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``; its input dim is 0)."""
        w = self.params[m.param].detach()
        return w.t() if (m.role == "in" and m.dim == 0) else w


def _combine(ctx: ScoringContext, groups: list[Group], member_fn, what: str) -> Scores:
    out: Scores = {}
    for g in groups:
        per = [s for j, m in enumerate(g.members) if (s := member_fn(g, j, m)) is not None]
        if not per:
            raise ValueError(f"importance: {what} cannot score group {g.name!r} (kind {g.kind}): no member it applies to")
        out[g.name] = C.aggregate(per, ctx.cfg.aggregation)
    return out


@register("magnitude_l1", "weights", WIDTH_KINDS + DEPTH_KINDS, "sum of |w| over each unit's weights")
def magnitude_l1(ctx: ScoringContext, groups: list[Group]) -> Scores:
    p = ctx.params
    return _combine(ctx, groups, lambda g, j, m: C.magnitude(p[m.param].detach(), m.dim, m.units, 1), "magnitude_l1")


@register("magnitude_l2", "weights", WIDTH_KINDS + DEPTH_KINDS, "L2 norm of each unit's weights")
def magnitude_l2(ctx: ScoringContext, groups: list[Group]) -> Scores:
    p = ctx.params
    return _combine(ctx, groups, lambda g, j, m: C.magnitude(p[m.param].detach(), m.dim, m.units, 2), "magnitude_l2")


def _kinds(groups: list[Group]) -> set[str]:
    return {g.kind for g in groups}


@register("taylor_vector", "gradients", WIDTH_KINDS + DEPTH_KINDS, "LLM-Pruner vector: |sum_u w*g|")
def taylor_vector(ctx: ScoringContext, groups: list[Group]) -> Scores:
    gs = ctx.gradients("vector", _kinds(groups))
    return _combine(ctx, groups, lambda g, j, m: C.taylor_vector(gs.wg[(g.name, j)]), "taylor_vector")


@register("taylor_element1", "gradients", WIDTH_KINDS + DEPTH_KINDS, "LLM-Pruner element1: sum_u |w*g|")
def taylor_element1(ctx: ScoringContext, groups: list[Group]) -> Scores:
    gs, p = ctx.gradients("element1", _kinds(groups)), ctx.params
    return _combine(ctx, groups, lambda g, j, m: C.taylor_element1(p[m.param].detach(), gs.grad[m.param], m.dim, m.units),
                    "taylor_element1")


@register("taylor_element2", "gradients", WIDTH_KINDS + DEPTH_KINDS,
          "LLM-Pruner element2: sum_u |w*g - w^2 F / 2|, F = per-sample diagonal Fisher (fp32)")
def taylor_element2(ctx: ScoringContext, groups: list[Group]) -> Scores:
    gs, p = ctx.gradients("element2", _kinds(groups)), ctx.params
    return _combine(ctx, groups, lambda g, j, m: C.taylor_element2(p[m.param].detach(), gs.grad[m.param],
                                                                   gs.fisher[m.param], m.dim, m.units), "taylor_element2")


def _column_estimator(ctx: ScoringContext, groups: list[Group], col_fn, what: str) -> Scores:
    def member(g, j, m):
        st = ctx.linear_stats(m)
        if st is None:
            return None
        return C.columns_to_units(col_fn(ctx.weight_out_in(m), st), m.units)
    return _combine(ctx, groups, member, what)


@register("wanda_sp", "activations", WIDTH_KINDS, "Wanda-sp: ||X_j||_2 * mean_i |W_ij| on Linear input columns")
def wanda_sp(ctx: ScoringContext, groups: list[Group]) -> Scores:
    return _column_estimator(ctx, groups, lambda w, st: C.wanda_columns(w, st.x_sqsum), "wanda_sp")


@register("flap", "activations", WIDTH_KINDS, "FLAP: Var(X_j) * ||W[:, j]||^2 on Linear input columns (+ bias compensation)")
def flap(ctx: ScoringContext, groups: list[Group]) -> Scores:
    return _column_estimator(ctx, groups, lambda w, st: C.flap_columns(w, st.x_sum, st.x_sqsum, st.n), "flap")




@register("flap_original", "activations", HEAD_KINDS + ("mlp_channel",),
          "FLAP as its code does it: WIFV Var(X_j)*||W[:, j]||^2 on o_proj / down_proj columns, o_proj's squared, "
          "standardized within each layer's consumer, heads = mean of their columns (use with allocation=pool: AL-AM)")
def flap_original(ctx: ScoringContext, groups: list[Group]) -> Scores:
    """FLAP (An et al. 2024) as its released code scores structures: per consumer column ``j`` the WIFV
    metric ``Var(X_j) ||W[:, j]||²`` (o_proj's squared), z-scored over that layer's columns (their
    ``standarlization`` is per layer, not across layers), a head scoring the mean of its columns. The
    scores are already on one scale, so ``allocation: pool`` ranks heads against MLP channels (AL-AM)."""
    def member(g, j, m):
        st = ctx.linear_stats(m)
        if st is None:
            return None
        col = C.flap_columns(ctx.weight_out_in(m), st.x_sum, st.x_sqsum, st.n)
        if g.kind in HEAD_KINDS:
            col = col ** 2
        col = (col - col.mean()) / col.std().clamp_min(1e-12)
        return col.cpu()[m.units.reshape(-1)].reshape(m.units.shape).mean(1)
    return _combine(ctx, groups, member, "flap_original")


@register("minitron", "activations", WIDTH_KINDS,
          "Minitron: L2 over samples of mean over tokens of |X_j| (head/channel/norm-output activations)")
def minitron(ctx: ScoringContext, groups: list[Group]) -> Scores:
    return _column_estimator(ctx, groups, lambda w, st: C.minitron_channels(st.mabs_sq), "minitron")


def _layer_metric(ctx: ScoringContext, groups: list[Group], metric: str) -> Scores:
    stats = ctx.activations()
    out: Scores = {}
    for g in groups:
        if g.kind not in DEPTH_KINDS:
            raise ValueError(f"importance: {metric} scores layers only, not group {g.name!r} ({g.kind})")
        out[g.name] = torch.tensor([layer_scores(stats, g.kind, metric)[g.layer]], dtype=torch.float32)
    return out


@register("block_influence", "activations", DEPTH_KINDS, "ShortGPT block influence 1 - E[cos(x_in, x_out)]")
def block_influence(ctx: ScoringContext, groups: list[Group]) -> Scores:
    return _layer_metric(ctx, groups, "block_influence")


@register("angular", "activations", DEPTH_KINDS, "Gromov et al. angular distance E[arccos cos(x_in, x_out)] / pi")
def angular(ctx: ScoringContext, groups: list[Group]) -> Scores:
    return _layer_metric(ctx, groups, "angular")


@register("random", "none", WIDTH_KINDS + DEPTH_KINDS, "uniform random scores (the floor), seeded by importance.seed")
def random_scores(ctx: ScoringContext, groups: list[Group]) -> Scores:
    gen = torch.Generator().manual_seed(int(ctx.cfg.seed))
    return {g.name: torch.rand(g.num_units, generator=gen) for g in groups}


LORAPRUNE = "loraprune"


@register(LORAPRUNE, "lora", WIDTH_KINDS,
          "LoRAPrune: per-module L2-normalised sum_u |W' (G_B A + B G_A - G_B G_A)| from LoRA factors and "
          "their gradients, EMA over steps, during LoRA tuning (prune.tune_rounds > 1 with train.lora; "
          "computed by shear.train.iterative)")
def _loraprune_outside_tuning(ctx: ScoringContext, groups: list[Group]) -> Scores:
    raise ValueError("importance.estimator='loraprune' scores from LoRA gradients while tuning: it needs "
                     "prune.tune_rounds > 1 and a train section with train.lora (prune-while-tuning)")
