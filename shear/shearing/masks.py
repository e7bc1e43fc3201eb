"""Hard-concrete masks over the analyzer's groups, attached with hooks (no modeling code changes).

Math (Louizos et al. 2018, as used by Sheared-LLaMA; FIELD-NOTES §4), per unit with parameter log α:
    train:  s = sigmoid((log u − log(1 − u) + log α) / β),  u ~ U(0, 1);  z = clamp(s·(r − l) + l, 0, 1)
    eval:   the top-k units of each row by log α keep clamp(sigmoid(log α)·(r − l) + l, 0, 1), the rest 0,
            with k = round(Σ P(z > 0)) of the row (or a fixed k, :attr:`HardConcrete.keep`); hidden
            masks are binary (kept channels 1), as :meth:`HardConcrete.fix` makes them
    P(z > 0) = sigmoid(log α − β·log(−l / r))                    (expected kept units, differentiable)
with β = 2/3, (l, r) = (−0.1, 1.1). log α starts at 5 (LLM-Shearing's init) and is clamped to
``[log 1e-2, log 1e2]`` before every draw (LLM-Shearing's ``constrain_parameters``), i.e. after every
optimizer step: at log(1e2) ≈ 4.6 the eval mask is still exactly 1 and P(z > 0) ≈ 0.998.

Where each mask acts (every hook multiplies activations, so a mask value folds linearly into weights):
    head / kv_group / query_head  pre-hook on o_proj: input columns of unit u × z_u
    mlp_channel                   pre-hook on down_proj (fc2): input column u × z_u
    layer                         hook on the block's residual writers (o_proj, down_proj outputs) × z
    hidden                        hook on every embedding output and every residual writer's output × z
Dropped hidden channels are exactly 0 in the residual stream. With ``hidden_norm="kept"`` (LLM-Shearing)
a hook on every hidden RMSNorm rescales its output so that its statistic runs over the k channels with
z ≠ 0 only: ``rsqrt(Σx²/k + ε)`` instead of ``rsqrt(Σx²/d + ε)``, the norm of the sliced model with its
own weights and ε (the finish undoes the slicer's sqrt(d / k) correction). With ``"all"`` the norm
divides by all d channels and the slicer's sqrt(d / k) correction makes slicing exact instead.
After :meth:`ShearMasks.fix` each mask returns fixed values (train and eval alike): the final top-k.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from shear.analyze.graph import HEAD_KINDS, StructureGraph

BETA, LEFT, RIGHT = 2.0 / 3.0, -0.1, 1.1
INIT_LOG_ALPHA = 5.0
#: log α bounds, clamped before every draw: LLM-Shearing's ``Mask.constrain_parameters``
#: (``clamp(log 1e-2, log 1e2)``), so P(z > 0) stays in about [0.047, 0.998] and no unit is beyond recall
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
#: mask type -> the group kinds it covers
MASK_TYPES = {"layers": ("layer",), "heads": HEAD_KINDS, "mlp": ("mlp_channel",), "hidden": ("hidden",)}


def sample_z(log_alpha: torch.Tensor) -> torch.Tensor:
    """Stretched, clamped hard-concrete sample; log_alpha [..., n] -> z [..., n] in [0, 1]."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def deterministic_z(log_alpha: torch.Tensor) -> torch.Tensor:
    """Deterministic value of a kept unit: clamp(sigmoid(log α)·(r − l) + l, 0, 1); 1 for log α ≥ log(11) ≈ 2.4."""
    return (torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) per unit, differentiable in log α (the expected-size term of the constraint)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def top_units(log_alpha: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Bool mask [rows, n]: the ``keep[r]`` units of row r with the largest log α (ties: lower index first)."""
    order = torch.argsort(log_alpha, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(log_alpha.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return rank < keep.to(rank.device).view(-1, 1)


class HardConcrete(nn.Module):
    """Masks of ``rows`` rows of ``n`` units each (one row per layer, or one row for hidden).

    Forward returns z ``[rows, n]``: sampled in training; in eval the top-k units of each row by log α
    (k = :attr:`keep`, or round(expected kept) of the row when None) with their deterministic value
    (1 with ``binary``); the fixed values set by :meth:`fix` in both modes once fixed.
    """

    def __init__(self, rows: int, n: int, init: float = INIT_LOG_ALPHA, binary: bool = False):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((rows, n), float(init)))
        self.register_buffer("fixed", None, persistent=False)
        self.binary = binary
        self.keep: int | None = None  # units kept per row by the eval mask; None = round(expected kept)

    def forward(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        return sample_z(self.log_alpha) if self.training else self.eval_z()

    def expected_rows(self) -> torch.Tensor:
        """Expected number of kept units per row ``[rows]``."""
        return prob_nonzero(self.log_alpha).sum(1)

    def expected_kept(self) -> torch.Tensor:
        """Expected number of kept units, summed over rows (scalar)."""
        return self.expected_rows().sum()

    def eval_keep(self) -> torch.Tensor:
        """Units the eval mask keeps per row (LongTensor [rows])."""
        if self.keep is not None:
            return torch.full((self.log_alpha.shape[0],), self.keep, dtype=torch.long)
        return self.expected_rows().detach().round().long().clamp(0, self.log_alpha.shape[1])

    def _values(self, kept: torch.Tensor, binary: bool) -> torch.Tensor:
        val = torch.ones_like(self.log_alpha) if binary else deterministic_z(self.log_alpha)
        return torch.where(kept, val, torch.zeros_like(val))

    def eval_z(self) -> torch.Tensor:
        """The deterministic (eval) mask: top-:meth:`eval_keep` units per row, the rest 0."""
        with torch.no_grad():
            return self._values(top_units(self.log_alpha, self.eval_keep()), self.binary)

    def fix(self, keep: int, binary: bool | None = None) -> torch.Tensor:
        """Top-``keep`` units per row by log α; kept units take their deterministic value (1 with
        ``binary``, default :attr:`binary`), the rest 0. Returns the boolean keep mask ``[rows, n]``."""
        with torch.no_grad():
            kept = top_units(self.log_alpha, torch.full((self.log_alpha.shape[0],), keep, dtype=torch.long))
            self.fixed = self._values(kept, self.binary if binary is None else binary)
        return kept


SCORE_INIT = (2.5, LOG_ALPHA_RANGE[1])  # log α range of score-initialized masks: eval mask still exactly 1,
#                                        and within the clamp (so no two units tie at its bound)


def init_from_scores_(masks: "ShearMasks", scores: dict[str, torch.Tensor], low: float = SCORE_INIT[0],
                      high: float = SCORE_INIT[1]) -> None:
    """Start each mask row's log α from the rank of its units' importance scores (``shear.importance.score``
    output, {group name: [num_units]}): the least important unit of a row at ``low``, the most at ``high``,
    evenly by rank. With low ≥ log(11) every deterministic value is still exactly 1 (an eval mask that keeps
    every unit changes no logits; one keeping round(Σ P(z > 0)) drops the lowest-ranked ~1%, P ≥ 0.98);
    the lowest-ranked units just reach zero first when the constraint pushes. Layers form one row."""
    with torch.no_grad():
        for t, gs in masks.groups.items():
            la = masks.masks[t].log_alpha
            rows = [torch.cat([scores[g.name].flatten() for g in gs])] if t == "layers" else [scores[g.name] for g in gs]
            for r, s in enumerate(rows):
                if s.numel() != la.shape[1]:
                    raise ValueError(f"shearing: scores of {t} row {r} have {s.numel()} units, the mask {la.shape[1]}")
                rank = s.float().argsort().argsort().to(la.dtype)  # 0 = least important
                la[r] = low + (high - low) * rank / max(1, s.numel() - 1)


def _module(model: nn.Module, param: str) -> nn.Module:
    return model.get_submodule(param.rpartition(".")[0])


def _unit_scale(units: torch.Tensor, z: torch.Tensor, width: int) -> torch.Tensor:
    """Per-feature scale [width] with feature ``units[u, :]`` set to ``z[u]``; z [n] -> [width]."""
    scale = z.new_ones(width)
    return scale.index_put((units.reshape(-1),), z.repeat_interleave(units.shape[1]))


class ShearMasks(nn.Module):
    """The masks of one model: ``masks[type]`` is a :class:`HardConcrete` (see ``MASK_TYPES``).

    ``groups[type]`` lists the graph's groups a mask's rows stand for, in row order.
    Hooks read ``self.current`` (z of every type), drawn once per forward by a pre-hook on the model.
    """

    def __init__(self, graph: StructureGraph, types: tuple[str, ...], hidden_norm: str = "kept",
                 log_alpha_range: tuple[float, float] | None = LOG_ALPHA_RANGE):
        super().__init__()
        if hidden_norm not in ("kept", "all"):
            raise ValueError(f"shearing.hidden_norm: {hidden_norm!r} is not 'kept' or 'all'")
        self.graph, self.hidden_norm = graph, hidden_norm
        self.log_alpha_range = tuple(log_alpha_range) if log_alpha_range is not None else None
        self.groups = {t: [g for g in graph.groups if g.kind in MASK_TYPES[t]] for t in types}
        self.groups = {t: gs for t, gs in self.groups.items() if gs}
        for t, gs in self.groups.items():
            if len({g.num_units for g in gs}) != 1:
                raise ValueError(f"shearing.masks.{t}: groups have different unit counts "
                                 f"({sorted({g.num_units for g in gs})}); learned masks need a uniform model")
        self.masks = nn.ModuleDict({t: HardConcrete(len(gs) if t != "layers" else 1,
                                                    gs[0].num_units if t != "layers" else len(gs), binary=t == "hidden")
                                    for t, gs in self.groups.items()})
        self.current: dict[str, torch.Tensor] = {}
        self.hidden_kept: int | None = None  # hidden channels with z != 0 in the current draw
        self.handles: list = []

    def constrain_(self) -> None:
        """Clamp every log α to :attr:`log_alpha_range` (no-op when None)."""
        if self.log_alpha_range is not None:
            with torch.no_grad():
                for m in self.masks.values():
                    m.log_alpha.clamp_(*self.log_alpha_range)

    def draw(self) -> dict[str, torch.Tensor]:
        """Clamp log α (so no forward ever sees a value outside the range), then draw z of every type."""
        self.constrain_()
        self.current = {t: m() for t, m in self.masks.items()}
        if "hidden" in self.current and self.hidden_norm == "kept":
            self.hidden_kept = int((self.current["hidden"] != 0).sum())
        return self.current

    def expected_kept(self) -> dict[str, torch.Tensor]:
        return {t: m.expected_kept() for t, m in self.masks.items()}

    def expected_rows(self) -> dict[str, torch.Tensor]:
        """Expected kept units of every row, per type: ``{type: [rows]}``."""
        return {t: m.expected_rows() for t, m in self.masks.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _norm_eps(mod: nn.Module) -> float:
    eps = next((getattr(mod, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(mod, a, None), float)), None)
    if eps is None:
        raise ValueError(f"shearing.hidden_norm: {type(mod).__name__} has no float eps / variance_epsilon")
    return eps


def attach_masks(model: nn.Module, graph: StructureGraph,
                 types: tuple[str, ...] = ("layers", "heads", "mlp", "hidden"), hidden_norm: str = "kept",
                 log_alpha_range: tuple[float, float] | None = LOG_ALPHA_RANGE) -> ShearMasks:
    """Attach hard-concrete masks for ``types`` to ``model`` with hooks; returns the mask module.

    ``graph`` is ``analyze(model)`` (kv_group or query_head heads). The masks' parameters are not
    registered in ``model``; pass ``masks.parameters()`` to the optimizer. ``masks.remove()`` detaches.
    ``hidden_norm``: hidden RMSNorm statistics over the kept channels (``"kept"``, LLM-Shearing) or all
    (``"all"``); ``log_alpha_range``: the clamp applied before every draw (None: no clamp).
    """
    hidden = [g for g in graph.groups if g.kind == "hidden"]
    if "hidden" in types and hidden and hidden[0].meta.get("norm") == "ln":
        raise ValueError(f"shearing: hidden channels of {graph.family} cannot be learned: masked channels do not pass "
                         "through LayerNorm linearly (its mean and variance mix them); learn heads, mlp and layers")
    sm = ShearMasks(graph, types, hidden_norm, log_alpha_range).to(next(model.parameters()).device)
    sm.handles.append(model.register_forward_pre_hook(lambda mod, args: (sm.draw(), None)[1]))
    in_scales: dict[str, list] = {}   # module -> [(type, row, units)] scaling its input columns
    out_scales: dict[str, list] = {}  # module -> [(type, row, col)] scaling its output
    for t in ("heads", "mlp"):
        for row, g in enumerate(sm.groups.get(t, [])):
            m = next(m for m in g.members if m.role == "in")
            in_scales.setdefault(m.param.rpartition(".")[0], []).append((t, row, m.units))
    for col, g in enumerate(sm.groups.get("layers", [])):
        for p in g.meta["outputs"]:
            if p.endswith(".weight"):
                out_scales.setdefault(p.rpartition(".")[0], []).append(("layers", 0, col))
    if "hidden" in sm.groups:
        for g in sm.groups["layers"] if "layers" in sm.groups else graph.by_kind("layer"):
            for p in g.meta["outputs"]:
                if p.endswith(".weight"):
                    out_scales.setdefault(p.rpartition(".")[0], []).append(("hidden", 0, None))
        for m in sm.groups["hidden"][0].members:
            if m.role == "embed":
                out_scales.setdefault(m.param.rpartition(".")[0], []).append(("hidden", 0, None))

    def pre_hook(entries):
        def hook(mod, args):
            x = args[0]
            for t, row, units in entries:
                x = x * _unit_scale(units.to(x.device), sm.current[t][row], x.shape[-1]).to(x.dtype)
            return (x,) + tuple(args[1:])
        return hook

    def out_hook(entries):
        def hook(mod, args, out):
            for t, row, col in entries:
                z = sm.current[t][row]
                out = out * (z[col] if col is not None else z).to(out.dtype)
            return out
        return hook

    def norm_hook(eps):  # rsqrt(Σx²/d + ε) -> rsqrt(Σx²/k + ε): dropped channels of x are exactly 0
        def hook(mod, args, out):
            k, d = sm.hidden_kept, out.shape[-1]
            if k is None or k >= d:
                return out
            ss = args[0].float().pow(2).sum(-1, keepdim=True)
            return out * torch.sqrt((ss / d + eps) / (ss / max(k, 1) + eps)).to(out.dtype)
        return hook

    if "hidden" in sm.groups and hidden_norm == "kept":
        for name in dict.fromkeys(m.param.rpartition(".")[0] for m in sm.groups["hidden"][0].members if m.role == "norm"):
            mod = model.get_submodule(name)
            sm.handles.append(mod.register_forward_hook(norm_hook(_norm_eps(mod))))
    for name, entries in in_scales.items():
        sm.handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook(entries)))
    for name, entries in out_scales.items():
        sm.handles.append(model.get_submodule(name).register_forward_hook(out_hook(entries)))
    return sm
