"""Architectures outside ``FAMILIES``: MLP-channel, hidden and layer groups from torch-pruning.

torch-pruning 1.6.1's ``DependencyGraph`` traces a forward pass (``use_cache=False``: the KV cache
in the output otherwise breaks tracing) and couples channels through Linear/Embedding/LayerNorm
layers. Attention heads are not taken from it: it does not know head structure from a traced
matmul, and with GQA (``num_key_value_heads < num_attention_heads``) asking for the group of a
q/k/v projection loops forever in ``_fix_dependency_graph_non_recursive`` (upstream issue
VainF/Torch-Pruning#527). So attention is found by structure before any group is asked for
(:func:`attention_linears`: by name, and for GQA also by the K/V width) and its projections are
never roots; building the graph and the hidden / MLP groups does not loop. Any index mapping that
loses its root (``root_idx is None``) is an error.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from shear.analyze.families import FAMILIES
from shear.analyze.graph import Group, Member, StructureGraph

_ATTN = re.compile(r"attn|attention|self_attn|q_proj|k_proj|v_proj|query|key|value", re.I)


def _guard(model: nn.Module) -> None:
    kind = getattr(model.config, "model_type", type(model).__name__)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(f"{kind}: not a family shear analyzes from shapes; torch-pruning needs real weights "
                         "(meta-device analysis covers the families in shear.analyze.families)")
    if not any(_ATTN.search(n.rsplit(".", 1)[-1]) for n, _ in model.named_modules()):
        raise ValueError(f"{kind}: no attention/MLP blocks to prune (state-space or other mixers); shear prunes "
                         f"transformer blocks: the families {sorted(FAMILIES)}, or other attention models with weights")


def _attention_widths(config) -> set[int]:
    """Output widths only a GQA attention projection has: K/V (``kv * head_dim``) and fused QKV."""
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not (isinstance(heads, int) and isinstance(kv, int) and 0 < kv < heads):
        return set()
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {kv * hd, (heads + 2 * kv) * hd}


def attention_linears(model: nn.Module, blocks: nn.ModuleList, prefix: str) -> set[str]:
    """Names of the Linears of the attention sublayers, found by structure: those whose name says so
    (``_ATTN``) and, under GQA, every Linear of a block's child module holding a K/V- or fused-QKV-wide
    Linear (whatever it is called). Never a root of a torch-pruning group (the GQA loop above)."""
    widths = _attention_widths(model.config)
    out = set()
    for i, block in enumerate(blocks):
        for child_name, child in block.named_children():
            lins = {f"{prefix}.{i}.{child_name}.{n}".rstrip("."): m for n, m in child.named_modules()
                    if isinstance(m, nn.Linear)}
            if any(m.out_features in widths for m in lins.values()):
                out.update(lins)
    return out | {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _ATTN.search(n)}


def _members(item, names: dict) -> list[Member]:
    """Members of one torch-pruning group item (module + handler + plain indices)."""
    mod, handler = item.dep.target.module, getattr(item.dep.handler, "__name__", str(item.dep.handler))
    out_ch = "out" in handler
    if isinstance(mod, nn.Parameter):
        return [(names[id(mod)], 0, "norm")]
    prefix = names.get(id(mod))
    if prefix is None:
        return []
    res = []
    if isinstance(mod, nn.Embedding):
        res.append((f"{prefix}.weight", 1, "embed"))
    elif isinstance(mod, nn.Linear):
        res.append((f"{prefix}.weight", 0 if out_ch else 1, "out" if out_ch else "in"))
        if out_ch and mod.bias is not None:
            res.append((f"{prefix}.bias", 0, "bias"))
    elif isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 1:
        res += [(f"{prefix}.{a}", 0, "norm") for a in ("weight", "bias") if getattr(mod, a, None) is not None]
    return res


def _to_group(group, names: dict, name: str, kind: str, n: int, layer: int | None) -> Group:
    members = []
    for item in group.items:
        if any(r is None for r in item.root_idxs):
            raise ValueError(f"group {name!r}: torch-pruning lost the root index of {names.get(id(item.dep.target.module))}")
        for pname, dim, role in _members(item, names):
            units = [[] for _ in range(n)]
            for idx, root in zip(item.idxs, item.root_idxs):
                units[root].append(idx)
            if len({len(u) for u in units}) != 1:
                raise ValueError(f"group {name!r}: irregular index mapping into {pname}")
            members.append(Member(pname, dim, torch.tensor(units, dtype=torch.long), role=role))
    return Group(name, kind, n, members, layer=layer)


def analyze_with_torch_pruning(model: nn.Module, heads: str = "kv_group") -> StructureGraph:
    """MLP-channel, hidden and layer groups of a model outside ``FAMILIES`` (GQA included) through
    torch-pruning's DependencyGraph; attention projections are skipped (``meta["skipped_attention"]``)."""
    import torch_pruning as tp

    from shear.analyze.build import _count, _is_matmul, shapes_of

    _guard(model)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    bname = names[id(blocks)]
    attention = attention_linears(model, blocks, bname)
    names.update({id(p): n for n, p in model.named_parameters()})
    ids = torch.randint(0, model.config.vocab_size, (1, 8), device=next(model.parameters()).device)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": ids, "use_cache": False})
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    d = emb.weight.shape[1]
    hidden = _to_group(dg.get_pruning_group(emb, tp.prune_embedding_out_channels, list(range(d))),
                       names, "hidden", "hidden", d, None)
    groups, seen = [], {(m.param, m.dim) for m in hidden.members}
    skipped = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is head or (f"{name}.weight", 0) in seen:
            continue
        layer = re.search(r"\.(\d+)\.", name)
        if layer is None or name in attention:
            skipped.append(name)
            continue
        g = dg.get_pruning_group(mod, tp.prune_linear_out_channels, list(range(mod.out_features)))
        grp = _to_group(g, names, f"layers.{layer.group(1)}.mlp_channel", "mlp_channel", mod.out_features,
                        int(layer.group(1)))
        if any(_ATTN.search(m.param) for m in grp.members):
            skipped.append(name)
            continue
        seen.update((m.param, m.dim) for m in grp.members)
        groups.append(grp)
    for i, block in enumerate(blocks):
        ms = [Member(f"{bname}.{i}.{pn}", 0, torch.zeros(1, 0, dtype=torch.long), role="whole")
              for pn, _ in block.named_parameters()]
        # what writes into the residual stream: hidden-group rows ("out") of this block, for mask_
        outputs = [m.param for m in hidden.members if m.role in ("out", "bias") and m.param.startswith(f"{bname}.{i}.")]
        groups.append(Group(f"layers.{i}.layer", "layer", 1, ms, layer=i, module=f"{bname}.{i}",
                            meta={"outputs": outputs}))
    groups.insert(len(groups) - len(blocks), hidden)
    # tied weights under every name: torch-pruning names the LM head of a tied model (Falcon) too
    params, mods = dict(model.named_parameters(remove_duplicate=False)), dict(model.named_modules())
    for g in groups:
        g.params_per_unit, g.macs_per_unit = _count(params, mods, g.members)
    total_macs = sum(m.weight.numel() for m in model.modules() if _is_matmul(m))
    return StructureGraph(f"torch_pruning:{model.config.model_type}", groups,
                          sum(p.numel() for p in model.parameters()), total_macs,
                          meta={"heads": heads, "num_layers": len(blocks), "layers": bname,
                                "refused": {"hidden": f"{model.config.model_type!r} has no family entry "
                                                      "(shear.analyze.families); the torch-pruning fallback "
                                                      "slices MLP channels and layers only"},
                                "skipped_attention": skipped, "shapes": shapes_of(params),
                                "note": "attention heads are not analyzed by the torch-pruning fallback"})
