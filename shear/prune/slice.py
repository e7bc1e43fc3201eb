"""Physical slicing (``prune_``) and its reference, zeroing (``mask_``).

``prune_(model, plan)`` removes, for every group of the plan, ``index_select(dim, kept)`` from each
member, updates the module attributes transformers reads at forward time and the config (by the
same code), and removes layers / sublayers. Removing a width unit equals zeroing it exactly,
except hidden channels under a norm, where the statistics run over fewer channels:

* RMSNorm (exact correction): with ``d`` channels kept ``d'``, ``rsqrt(Σx²/d + ε) =
  sqrt(d/d') · rsqrt(Σx²/d' + ε·d/d')``, so each hidden norm weight is scaled by ``sqrt(d/d')``
  (Gemma: ``1 + w``) and every RMSNorm ``ε`` (and ``config.rms_norm_eps``) by ``d/d'``. Qwen3's
  q/k norms share that ε: they get ``ε·d/d'`` too (a relative change of ε in the head norm).
  Gemma scales embeddings by ``sqrt(hidden_size)``: embeddings are rescaled by ``sqrt(d/d')``
  (with tied embeddings the final norm absorbs the factor, so logits are unchanged).
* LayerNorm (GPT-2, OPT, BERT): centring mixes every channel, so no exact correction exists:
  slicing hidden channels is not equal to zeroing them (documented, tested as such).

Dropping a sublayer of a post-norm block (BERT) is not offered; dropping a whole post-norm block
differs from zeroing its outputs (the norms still act) and is documented.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from shear.analyze.families import FAMILIES, set_attn_heads
from shear.analyze.graph import DEPTH_KINDS, PrunePlan, StructureGraph
from shear.prune.modeling_pruned import Dropped


def _graph_for(model, plan: PrunePlan, graph: StructureGraph | None) -> StructureGraph:
    if graph is not None:
        return graph
    from shear.analyze import analyze

    heads = "query_head" if any(k.endswith(".query_head") for k in plan.remove) else "kv_group"
    return analyze(model, heads=heads)


def validate(plan: PrunePlan, graph: StructureGraph, model: nn.Module | None = None) -> dict[str, list[int]]:
    """Check a plan against a graph (and the graph against the model); ``{group: sorted units}``.

    Raises ValueError naming the group: unknown group, non-integer or out-of-range units, every
    unit of a width group, or a graph built for other shapes than the model's (stale graph).
    """
    names = {g.name: g for g in graph.groups}
    shapes = graph.meta.get("shapes", {})
    params = dict(model.named_parameters()) if model is not None else {}
    out: dict[str, list[int]] = {}
    for name, units in plan.remove.items():
        if name not in names:
            raise ValueError(f"group {name!r}: not in the structure graph (kinds here: "
                             f"{sorted({g.kind for g in graph.groups})})")
        g = names[name]
        if g.kind == "hidden" and units and "hidden" in graph.meta.get("refused", {}):
            raise ValueError(f"group 'hidden': {graph.meta['refused']['hidden']}")
        for m in g.members if params else []:
            have = tuple(params[m.param].shape) if m.param in params else None
            if have != shapes.get(m.param, have):
                raise ValueError(f"group {name!r}: {m.param} has shape {have} but the graph was built for "
                                 f"{shapes.get(m.param)} (stale graph: analyze the model again)")
        try:
            u = sorted({int(x) for x in units})
        except (TypeError, ValueError):
            raise ValueError(f"group {name!r}: units must be integers, got {units!r}") from None
        if u and (u[0] < 0 or u[-1] >= g.num_units):
            raise ValueError(f"group {name!r}: unit {u[0] if u[0] < 0 else u[-1]} out of range [0, {g.num_units})")
        if g.kind not in DEPTH_KINDS and len(u) == g.num_units:
            hint = {"hidden": "the hidden size cannot be 0",
                    "mlp_channel": f"drop the sublayer with 'layers.{g.layer}.mlp_sublayer'"}.get(
                g.kind, f"drop the sublayer with 'layers.{g.layer}.attn_sublayer'")
            raise ValueError(f"group {name!r}: removes all {g.num_units} units of the layer; {hint}")
        if u:
            out[name] = u
    return out


def mask_(model: nn.Module, plan: PrunePlan, graph: StructureGraph | None = None) -> nn.Module:
    """Zero every member of the plan instead of removing it (the reference for ``prune_``).

    Width groups: the indexed slices of every member become 0. Depth groups: the sublayer outputs
    (o_proj/down_proj weight and bias) become 0, so a pre-norm residual branch adds nothing.
    """
    graph = _graph_for(model, plan, graph)
    remove = validate(plan, graph, model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, units in remove.items():
            g = graph[name]
            if g.kind in DEPTH_KINDS:
                for p in g.meta.get("outputs", []):
                    params[p].zero_()
                continue
            for m in g.members:
                params[m.param].index_fill_(m.dim, m.indices(units).to(params[m.param].device), 0)
    return model


def _replace_param(model: nn.Module, name: str, new: torch.Tensor) -> None:
    """Put ``new`` in every slot holding the parameter ``name`` (tied weights stay tied)."""
    old = model.get_parameter(name)
    p = nn.Parameter(new, requires_grad=old.requires_grad)
    for mod in model.modules():
        for attr, q in list(mod._parameters.items()):
            if q is old:
                mod._parameters[attr] = p


def _sync_shapes(model: nn.Module) -> None:
    """Shape attributes of Linear / Conv1D / Embedding / LayerNorm from their (sliced) weights."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = w.shape
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = w.shape[1]
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = (w.shape[0],)
        elif type(mod).__name__ == "Conv1D":
            mod.nx, mod.nf = w.shape


def _slice_widths(model, graph, remove) -> None:
    cut: dict[tuple[str, int], set[int]] = defaultdict(set)
    for name, units in remove.items():
        g = graph[name]
        if g.kind not in DEPTH_KINDS:
            for m in g.members:
                cut[(m.param, m.dim)].update(m.indices(units).tolist())
    with torch.no_grad():
        for (pname, dim), idx in cut.items():
            p = model.get_parameter(pname)
            keep = torch.tensor(sorted(set(range(p.shape[dim])) - idx), dtype=torch.long, device=p.device)
            _replace_param(model, pname, p.data.index_select(dim, keep))


def _new_heads(g, removed: int) -> tuple[int, int]:
    H, K = g.meta["heads"], g.meta["kv_heads"]
    if g.kind == "kv_group":
        return H - removed * (H // K), K - removed
    if g.kind == "query_head":
        return H - removed * K, K
    return H - removed, K - removed  # MHA heads


def _layer_widths(fam, graph, remove, n_layers) -> list[dict]:
    """Per layer ``{"heads", "kv_heads", "head_dim", "intermediate"}`` after the plan (None = absent)."""
    out = [dict(heads=None, kv_heads=None, head_dim=None, intermediate=None) for _ in range(n_layers)]
    gone = {graph[n].layer: graph[n].kind for n in remove if graph[n].kind in DEPTH_KINDS}
    for g in graph.groups:
        r = len(remove.get(g.name, []))
        if gone.get(g.layer) == "layer" or (gone.get(g.layer) == "attn_sublayer" and g.kind != "mlp_channel") \
                or (gone.get(g.layer) == "mlp_sublayer" and g.kind == "mlp_channel"):
            continue  # removed with its layer / sublayer: no width to report
        if g.kind in ("head", "kv_group", "query_head"):
            H, K = _new_heads(g, r)
            out[g.layer].update(heads=H, kv_heads=K, head_dim=g.meta["head_dim"])
        elif g.kind == "mlp_channel":
            out[g.layer]["intermediate"] = g.num_units - r
    return out


def _update_config(model, fam, widths, d_new) -> None:
    """Write heads / KV heads / MLP width / hidden size; per-layer lists when not uniform."""
    cfg = model.config
    c_heads, c_kv, c_inter, c_hidden, _ = fam.cfg
    non_uniform = False
    for key, attr in (("heads", c_heads), ("kv_heads", c_kv), ("intermediate", c_inter)):
        vals = {w[key] for w in widths if w[key] is not None}
        if attr and vals:
            setattr(cfg, attr, max(vals))
            non_uniform |= len(vals) > 1
    dims = {w["head_dim"] for w in widths if w["head_dim"]}
    if fam.attn_style in ("llama", "phi3", "neox") and dims:  # neox: read by its rotary table only
        cfg.head_dim = dims.pop()
    if d_new is not None:
        if fam.name == "opt" and cfg.word_embed_proj_dim == getattr(cfg, c_hidden):
            cfg.word_embed_proj_dim = d_new
        setattr(cfg, c_hidden, d_new)
    old = getattr(cfg, "shear_layers", None)
    if non_uniform or old:
        old = old or [{} for _ in widths]
        cfg.shear_layers = [dict(o, **{k: v for k, v in (("num_attention_heads", w["heads"]),
                                                        ("num_key_value_heads", w["kv_heads"]),
                                                        ("intermediate_size", w["intermediate"])) if v is not None})
                            for o, w in zip(old, widths)]


def _drop_depth(model, fam, graph, remove, d_model) -> None:
    """Replace dropped sublayers by ``Dropped``/``Identity`` and delete removed blocks (renumbered)."""
    cfg = model.config
    gone: set[int] = set()
    for name in remove:
        g = graph[name]
        if g.kind == "layer":
            gone.add(g.layer)
        elif g.kind in ("attn_sublayer", "mlp_sublayer"):
            attn = g.kind == "attn_sublayer"
            out_path = f"{graph.meta['layers']}.{g.layer}.{fam.mlp_out}"
            for mod in g.meta["modules"]:  # the module producing the residual update returns zeros [.., d]
                owns_out = attn or out_path == mod or out_path.startswith(mod + ".")
                _set(model, mod, Dropped(d_model if owns_out else 0, returns_tuple=attn,
                                         layer_idx=g.layer if attn else None))
            for norm in g.meta["norms"]:
                _set(model, norm, nn.Identity())
            if getattr(cfg, "shear_layers", None) is None:
                cfg.shear_layers = [{} for _ in range(graph.meta["num_layers"])]
            cfg.shear_layers[g.layer]["attention" if attn else "mlp"] = False
    _remove_layers(model, graph.meta["layers"], gone, fam.cfg[4], fam.layer_lists)


def _remove_layers(model, layers_path: str, gone: set[int], n_layers_attr: str = "num_hidden_layers",
                   lists: tuple[str, ...] = ()) -> None:
    """Delete blocks ``gone`` of the ModuleList at ``layers_path``; renumber ``layer_idx``; fix the config."""
    if not gone:
        return
    cfg, layers = model.config, model.get_submodule(layers_path)
    if len(gone) == len(layers):
        raise ValueError("group 'layers.*.layer': the plan removes every layer")
    kept = [i for i in range(len(layers)) if i not in gone]
    _set(model, layers_path, nn.ModuleList([layers[i] for i in kept]))
    for new_i, layer in enumerate(model.get_submodule(layers_path)):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_i
    setattr(cfg, n_layers_attr, len(kept))
    for key in ("layer_types", "shear_layers") + tuple(lists):
        if isinstance(getattr(cfg, key, None), list):
            setattr(cfg, key, [getattr(cfg, key)[i] for i in kept])
    _rebuild_per_type_rotary(model)


def _rebuild_per_type_rotary(model) -> None:
    """Rebuild rotary embeddings keyed by layer type (Gemma 3: one per ``sliding_attention`` /
    ``full_attention``) from the updated config once a layer type has no layer left: the stock class
    builds them from ``config.layer_types`` and cannot load a model holding tables for absent types."""
    types = sorted(set(getattr(model.config, "layer_types", None) or []))
    for name, mod in list(model.named_modules()):
        if (type(mod).__name__.endswith("RotaryEmbedding") and isinstance(getattr(mod, "layer_types", None), list)
                and sorted(mod.layer_types) != types):
            old = {n: b for n, b in mod.named_buffers()}
            new = type(mod)(model.config, device=next(iter(old.values())).device)
            for n, b in new.named_buffers():
                if n in old and b.is_floating_point():
                    b.data = b.data.to(old[n].dtype)
            _set(model, name, new)


def _prune_generic(model, graph, remove) -> None:
    """Torch-pruning fallback graphs: MLP channels and whole layers (module docstring of fallback)."""
    for name in remove:
        if graph[name].kind not in ("mlp_channel", "layer"):
            raise ValueError(f"group {name!r}: {graph.family} (torch-pruning fallback) slices only "
                             "mlp_channel and layer groups")
    _slice_widths(model, graph, remove)
    _sync_shapes(model)
    gone = {graph[n].layer for n in remove if graph[n].kind == "layer"}
    widths = {g.layer: g.num_units - len(remove.get(g.name, [])) for g in graph.by_kind("mlp_channel")
              if g.layer not in gone}
    layers = model.get_submodule(graph.meta["layers"])
    for i, w in widths.items():
        for mod in layers[i].modules():
            if isinstance(getattr(mod, "intermediate_size", None), int):
                mod.intermediate_size = w
    if widths and hasattr(model.config, "intermediate_size"):
        model.config.intermediate_size = max(widths.values())
        if len(set(widths.values())) > 1:
            model.config.shear_layers = [{"intermediate_size": widths.get(i)} for i in range(len(layers))]
    _remove_layers(model, graph.meta["layers"], gone)


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def prune_(model: nn.Module, plan: PrunePlan, graph: StructureGraph | None = None) -> nn.Module:
    """Remove the plan's units from ``model`` in place; config and module attributes follow.

    Args:
        model: a model of a supported family (any device; ``meta`` works for shapes).
        plan: unit numbers per group name, numbered as in ``graph`` (the model before slicing).
        graph: ``analyze(model, ...)`` of this model; built when omitted (``query_head`` when the plan
            names such groups).
    Returns the same model. Raises ValueError naming the group for an invalid plan.
    """
    graph = _graph_for(model, plan, graph)
    fam = FAMILIES.get(graph.family)
    remove = validate(plan, graph, model)
    if not remove:
        return model
    if fam is None:
        if not graph.family.startswith("torch_pruning:"):
            raise ValueError(f"family {graph.family!r}: slicing supports {sorted(FAMILIES)}")
        _prune_generic(model, graph, remove)
        return model
    n_layers = graph.meta["num_layers"]
    widths = _layer_widths(fam, graph, remove, n_layers)
    d = graph["hidden"].num_units
    d_new = d - len(remove.get("hidden", []))
    _slice_widths(model, graph, remove)
    _sync_shapes(model)
    _update_config(model, fam, widths, d_new if d_new != d else None)
    layers = model.base_model.get_submodule(fam.layers)
    for i, w in enumerate(widths):
        for mod in layers[i].modules():
            if w["intermediate"] is not None and isinstance(getattr(mod, "intermediate_size", None), int):
                mod.intermediate_size = w["intermediate"]
            if d_new != d and getattr(mod, "hidden_size", None) == d:
                mod.hidden_size = d_new
        if w["heads"] is not None:
            attn = layers[i].get_submodule((fam.q or fam.qkv).rpartition(".")[0])
            set_attn_heads(fam, attn, w["heads"], w["kv_heads"], w["head_dim"])
            if fam.attn_style in ("gpt2", "opt"):
                attn.embed_dim = d_new
    _correct_head_norms(model, graph, remove)
    if d_new != d:
        _correct_hidden_norms(model, fam, graph, d, d_new)
    _drop_depth(model, fam, graph, remove, d_new)
    return model


def _correct_head_norms(model, graph, remove) -> None:
    """RMSNorms over a whole projection (OLMo 2's q_norm/k_norm, ``[H*D]``) cut by head slicing: weight
    times ``sqrt(n/n')`` as for hidden channels; ε stays the config's shared ``rms_norm_eps`` (exact up to
    ε·(n/n' - 1) inside the root, a relative change of ~1e-6 at the usual ε; the stock class has one ε)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in remove:
            g = graph[name]
            for m in g.members if g.kind in ("head", "kv_group", "query_head") else ():
                mod_name = m.param.rpartition(".")[0]
                if m.role != "norm" or not type(model.get_submodule(mod_name)).__name__.endswith("RMSNorm"):
                    continue
                n = g.num_units * m.width
                w = params[m.param]
                if w.ndim == 1 and w.shape[0] < n:
                    w.mul_(math.sqrt(n / w.shape[0]))


def _correct_hidden_norms(model, fam, graph, d: int, d_new: int) -> None:
    """Exact RMSNorm correction for removed hidden channels (module docstring)."""
    if fam.norm == "ln":
        return
    c = math.sqrt(d / d_new)
    g = graph["hidden"]
    norms = {m.param.rpartition(".")[0] for m in g.members if m.role == "norm"}
    scale = dict.fromkeys(norms, c)
    if fam.norm == "rms1p":  # Gemma: x * sqrt(hidden_size) embedding scale
        emb = model.get_input_embeddings()
        with torch.no_grad():
            emb.weight.mul_(c)
        if hasattr(emb, "embed_scale"):  # buffer set from config.hidden_size at construction
            emb.scalar_embed_scale = d_new ** 0.5
            emb.embed_scale.fill_(d_new ** 0.5)
        if g.meta["tied_embeddings"]:
            for p in fam.final_norms:
                scale[f"{graph.meta['prefix']}{p}"] /= c
    with torch.no_grad():
        for name, s in scale.items():
            w = model.get_submodule(name).weight
            w.mul_(s) if fam.norm == "rms" else w.copy_((1 + w) * s - 1)
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(mod, attr, None), float):
                    setattr(mod, attr, getattr(mod, attr) * d / d_new)
    if hasattr(model.config, "rms_norm_eps"):
        model.config.rms_norm_eps = model.config.rms_norm_eps * d / d_new
