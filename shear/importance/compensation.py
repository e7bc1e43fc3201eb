"""FLAP bias compensation (An et al. 2024, eq. 7): removed input channels leave their mean behind.

Removing input columns ``R`` of a Linear ``y = W x`` changes its output by ``-W[:, R] x_R``; with
``x_R`` replaced by its calibration mean the expected output is kept by a bias
``b = W[:, R] @ mean(x_R)`` (``[out]``). Computed before slicing (weights and stats in the old
numbering), then written into the sliced model, which must declare biases to reload: for Llama,
``config.attention_bias`` / ``config.mlp_bias`` cover q/k/v/o and gate/up/down together, so the
siblings get zero biases.
"""
from __future__ import annotations

import torch
from torch import nn

from shear.analyze.graph import PrunePlan, StructureGraph
from shear.importance.calibrate import ActivationStats

COMPENSATED_KINDS = ("head", "kv_group", "query_head", "mlp_channel")


def compensation_biases(model: nn.Module, plan: PrunePlan, graph: StructureGraph,
                        stats: ActivationStats) -> dict[str, torch.Tensor]:
    """``{Linear module name: bias [out]}`` for the input columns the plan removes (old numbering).

    Rows the plan also removes (hidden channels) and modules of removed layers are dropped.
    """
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        units = plan.remove.get(g.name)
        if g.kind not in COMPENSATED_KINDS or not units:
            continue
        for m in g.members:
            mod = m.param[: -len(".weight")] if m.param.endswith(".weight") else None
            st = stats.linears.get(mod) if (mod and m.dim == 1) else None
            if st is None:
                continue
            idx = m.indices(units)
            w = params[m.param].detach()
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
                if mod in biases and m.dim == 0:
                    removed = set(m.indices(plan.remove[g.name]).tolist())
                    keep_rows[mod] = torch.tensor([i for i in range(biases[mod].numel()) if i not in removed])
    out = {}
    for mod, b in biases.items():
        if any(d and (mod + ".").startswith(d + ".") for d in dead_layers):
            continue
        out[mod] = b[keep_rows[mod]] if mod in keep_rows else b
    return out


def _add_bias(lin: nn.Linear, b: torch.Tensor | None) -> None:
    w = lin.weight
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    if b is not None:
        with torch.no_grad():
            lin.bias.add_(b.to(lin.bias.dtype).to(lin.bias.device))


def apply_biases_(model: nn.Module, biases: dict[str, torch.Tensor]) -> list[str]:
    """Add ``biases`` to the named Linears (creating bias parameters), zero biases for siblings that the
    config flag also covers, and set ``attention_bias`` / ``mlp_bias``. Returns the config flags set."""
    if not biases:
        return []
    mods = dict(model.named_modules())
    flags = set()
    for name, b in biases.items():
        lin = mods[name]
        if lin.weight.shape[0] != b.numel():
            raise ValueError(f"bias compensation: {name} has {lin.weight.shape[0]} outputs, bias {b.numel()}")
        _add_bias(lin, b)
        flags.add("attention_bias" if ".self_attn." in name + "." else "mlp_bias" if ".mlp." in name + "." else None)
    flags.discard(None)
    for name, mod in mods.items():
        if isinstance(mod, nn.Linear) and name not in biases and ".layers." in name:
            part = "attention_bias" if ".self_attn." in name else "mlp_bias" if ".mlp." in name else None
            if part in flags:
                _add_bias(mod, None)
    for f in flags:
        if hasattr(model.config, f):
            setattr(model.config, f, True)
    return sorted(flags)
