"""FLAP bias compensation (An et al. 2024, eq. 7): removed input channels leave their mean behind.

Removing input columns ``R`` of a Linear ``y = W x`` changes its output by ``-W[:, R] x_R``; with
``x_R`` replaced by its calibration mean the expected output is kept by a bias
``b = W[:, R] @ mean(x_R)`` (``[out]``). Computed before slicing (weights and stats in the old
numbering), then written into the sliced model.

Where a bias can live (:func:`plan_biases`) decides whether the export still loads, so it is decided
per projection, never assumed:

- the projection already has a bias (GPT-2, OPT, BERT): it is added to it;
- the family has a config flag covering it (Llama ``attention_bias`` / ``mlp_bias``, Qwen3/Gemma
  ``attention_bias``): for a model that exports as the stock class the flag is set and every
  projection it covers gets a bias (zeros where nothing is compensated — the stock class builds all
  of them); a per-layer export (modeling file) holds just the compensated biases, no zeros;
- no slot (Mistral, Qwen2's o_proj, Phi-3, every gated MLP but Llama's): a per-layer export holds it;
  a stock export cannot, so it is **skipped** and reported (``skipped``), never written into a
  directory that would load without it.

The parameters the biases add are counted (:meth:`BiasPlan.added_params`) so plans meet budgets,
the zero biases a flag brings along included: Llama has no o-only or down-only flag, so compensating
o_proj gives q/k/v zero biases too (``attention_bias``) and down_proj gives gate/up ones (``mlp_bias``);
:func:`flag_zero_biases` counts them in the result for the report.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from shear.analyze.families import Family
from shear.analyze.graph import PrunePlan, StructureGraph
from shear.importance.calibrate import ActivationStats

COMPENSATED_KINDS = ("head", "kv_group", "query_head", "mlp_channel")


def compensation_biases(model: nn.Module, plan: PrunePlan, graph: StructureGraph,
                        stats: ActivationStats | None) -> dict[str, torch.Tensor]:
    """``{projection module name: bias [out]}`` for the input columns the plan removes (old numbering).

    Rows the plan also removes (hidden channels) and modules of removed layers are dropped. ``stats``
    None: the same keys with zero values (where biases would go, for a refit that computes its own values).
    """
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        units = plan.remove.get(g.name)
        if g.kind not in COMPENSATED_KINDS or not units:
            continue
        for m in g.members:
            mod = m.param[: -len(".weight")] if m.param.endswith(".weight") else None
            if stats is None and mod and m.role == "in":
                w = params[m.param].detach()
                out.setdefault(mod, torch.zeros((w.t() if m.dim == 0 else w).shape[0]))
                continue
            st = stats.linears.get(mod) if (mod and m.role == "in") else None
            if st is None:
                continue
            idx = m.indices(units)
            w = params[m.param].detach()
            w = w.t() if m.dim == 0 else w  # GPT-2 Conv1D: [in, out]
            b = w[:, idx.to(w.device)].double() @ st.mean[idx].to(w.device)
            out[mod] = out.get(mod, 0) + b.float().cpu()
    return _drop_removed_rows(out, plan, graph)


def _drop_removed_rows(biases: dict, plan: PrunePlan, graph: StructureGraph) -> dict:
    dead_layers = {g.module for g in graph.groups if g.kind == "layer" and plan.remove.get(g.name)}
    keep_rows: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        if g.kind == "hidden" and plan.remove.get(g.name):
            for m in g.members:
                mod = m.param[: -len(".weight")]
                if mod in biases and m.role == "out":
                    removed = set(m.indices(plan.remove[g.name]).tolist())
                    keep_rows[mod] = torch.tensor([i for i in range(biases[mod].numel()) if i not in removed])
    out = {}
    for mod, b in biases.items():
        if _in_any(mod, dead_layers):
            continue
        out[mod] = b[keep_rows[mod]] if mod in keep_rows else b
    return out


def _in_any(name: str, prefixes) -> bool:
    return any(p and (name + ".").startswith(p + ".") for p in prefixes)


@dataclass
class BiasPlan:
    """What :func:`apply_biases_` will write (module names in the numbering of ``plan_biases``' model).

    ``add``: module -> bias (``None`` = a zero bias the stock class needs beside a compensated one);
    ``flags``: config flags to set; ``skipped``: compensated modules with no slot in a stock export.
    """

    add: dict[str, torch.Tensor | None] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def added_params(self, counter, removed: dict[str, int]) -> int:
        """Parameters the new biases add: each new bias has the out-width its weight keeps after the plan.

        ``counter``: a :class:`~shear.prune.plan.ParamCounter` of the model; ``removed``: units per group.
        """
        total = 0
        for mod in self.add:
            w = f"{mod}.weight"
            if f"{mod}.bias" in counter.shapes or w not in counter.shapes:
                continue
            if any(removed.get(g, 0) for g in counter.depth[w]):
                continue
            d = counter.out_dim.get(w, 0)
            total += counter.shapes[w][d] - sum(removed.get(g, 0) * wd for g, wd in counter.dims[w][d])
        return total


def _block_path(name: str, layers_prefix: str) -> tuple[str, str] | None:
    """``("model.layers.3", "self_attn.o_proj")`` for ``model.layers.3.self_attn.o_proj``."""
    m = re.match(rf"^({re.escape(layers_prefix)}\.\d+)\.(.+)$", name)
    return (m.group(1), m.group(2)) if m else None


def plan_biases(model: nn.Module, fam: Family, graph: StructureGraph, biases: dict[str, torch.Tensor],
                stock: bool, removed_layers: set[str] = frozenset()) -> BiasPlan:
    """Decide where each compensation bias goes (see the module docstring).

    ``stock``: the pruned model will export as the stock class (uniform widths), so only slots the stock
    class has can hold biases. ``removed_layers``: block module names the plan deletes (no zeros there).
    """
    mods = dict(model.named_modules())
    layers_prefix = graph.meta.get("layers", "")
    bp = BiasPlan()
    flags: set[str] = set()
    for name, b in biases.items():
        lin = mods[name]
        if getattr(lin, "bias", None) is not None:
            bp.add[name] = b
            continue
        where = _block_path(name, layers_prefix)
        flag = fam.flag_for(where[1]) if where else None
        if stock and flag is None:
            bp.skipped.append(name)
            continue
        bp.add[name] = b
        if stock:
            flags.add(flag)
    for flag in sorted(flags):  # the stock class builds a bias on every projection the flag covers
        for lp in (f"{layers_prefix}.{i}" for i in range(graph.meta.get("num_layers", 0))):
            if lp in removed_layers:
                continue
            for rel in dict(fam.bias_flags)[flag]:
                name = f"{lp}.{rel}"
                if name in mods and name not in bp.add and getattr(mods[name], "bias", None) is None:
                    bp.add[name] = None
    bp.flags = sorted(flags)
    return bp


def flag_zero_biases(model: nn.Module, fam: Family, layers_prefix: str, flags) -> dict[str, int]:
    """Exactly-zero bias entries on the projections the config ``flags`` cover, by projection path in a
    block (``{"self_attn.q_proj": 960, ...}``, zero counts left out): parameters the stock export holds
    only because the flag makes its class build a bias on every projection it covers. Biases on the meta
    device (the blocks of a streamed model that are not in memory) are not counted."""
    covered = {rel for flag, rels in fam.bias_flags if flag in flags for rel in rels}
    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        where = _block_path(name, layers_prefix)
        b = getattr(mod, "bias", None)
        if where is None or where[1] not in covered or not isinstance(b, torch.Tensor) or b.is_meta:
            continue
        n = int((b.detach() == 0).sum())
        if n:
            out[where[1]] = out.get(where[1], 0) + n
    return out


def _add_bias(lin: nn.Module, b: torch.Tensor | None) -> None:
    w = lin.weight
    out = w.shape[1] if type(lin).__name__ == "Conv1D" else w.shape[0]
    if b is not None and b.numel() != out:
        raise ValueError(f"bias compensation: a projection with {out} outputs got a bias of {b.numel()}")
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device))
    if b is not None:
        with torch.no_grad():
            lin.bias.add_(b.to(lin.bias.dtype).to(lin.bias.device))


def apply_biases_(model: nn.Module, bp: BiasPlan) -> None:
    """Write a :class:`BiasPlan` (module names already in the sliced model's numbering) and set its flags."""
    mods = dict(model.named_modules())
    for name, b in bp.add.items():
        _add_bias(mods[name], b)
    for f in bp.flags:
        setattr(model.config, f, True)
