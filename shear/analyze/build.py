"""Build the :class:`StructureGraph` of a supported family from parameter shapes (works on ``meta``).

Groups follow FIELD-NOTES §2 (LLM-Pruner's coupled structures): a head / KV group (q, k, v rows +
o columns), a query head position inside every KV group, an MLP channel (gate/up rows + down
column), a hidden channel (one residual index in every embedding, norm, projection and the LM head),
and a block or one of its sublayers. Only shapes are read, so a 70B model built on the meta device
is analyzed without weights.
"""
from __future__ import annotations

import torch
from torch import nn

from shear.analyze.families import Family, head_dim_of, kv_heads_of
from shear.analyze.graph import Group, Member, StructureGraph

HEAD_MODES = ("kv_group", "query_head")


def _ranges(heads: list[int], width: int, offset: int = 0) -> torch.Tensor:
    """Flat indices of the given heads: ``[len(heads) * width]``."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offset + h * width, offset + (h + 1) * width) for h in heads])


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_dropped(mod: nn.Module | None) -> bool:
    return mod is None or type(mod).__name__ in ("Dropped", "Identity")


class _Ctx:
    """Naming and dims for one model: full parameter names and Linear/Conv1D orientation."""

    def __init__(self, model: nn.Module, fam: Family):
        self.model, self.fam = model, fam
        base = model.base_model
        self.prefix = next((n + "." for n, m in model.named_modules() if m is base and n), "")
        self.base = base

    def name(self, path: str, attr: str = "weight") -> str:
        return f"{self.prefix}{path}.{attr}"

    def param(self, path: str, attr: str = "weight") -> torch.nn.Parameter | None:
        mod = _get(self.base, path)
        return None if mod is None else getattr(mod, attr, None)

    def dim(self, io: str) -> int:
        """Weight dim of outputs (``io="out"``) or inputs (``"in"``)."""
        return (0 if io == "out" else 1) ^ int(self.fam.conv1d)

    def linear(self, path: str, io: str, units: torch.Tensor, with_bias: bool = True) -> list[Member]:
        """Members of one projection: weight along out/in, plus the bias when indexing outputs."""
        out = []
        if self.param(path) is not None:
            out.append(Member(self.name(path), self.dim(io), units, role=io))
        bias = self.param(path, "bias")
        if with_bias and io == "out" and bias is not None:
            out.append(Member(self.name(path, "bias"), 0, units, role="bias"))
        return out

    def norm(self, path: str, units: torch.Tensor) -> list[Member]:
        out = []
        for attr in ("weight", "bias"):
            if isinstance(self.param(path, attr), torch.Tensor):
                out.append(Member(self.name(path, attr), 0, units, role="norm"))
        return out


def _count(params: dict, mods: dict, members: list[Member]) -> tuple[int, int]:
    """(params, MACs per token) removed with one unit of these members."""
    n_params = n_macs = 0
    for m in members:
        p = params[m.param]
        per = (p.numel() // p.shape[m.dim] * m.width) if m.width else p.numel()
        n_params += per
        mod_name, _, attr = m.param.rpartition(".")
        if attr == "weight" and _is_matmul(mods.get(mod_name)):
            n_macs += per
    return n_params, n_macs


def _is_matmul(mod) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _attn_groups(c: _Ctx, i: int, lp: str, heads: str) -> list[Group]:
    fam, layer = c.fam, _get(c.base, lp)
    if _is_dropped(_get(layer, fam.attn)):
        return []
    attn = _get(layer, (fam.q or fam.qkv).rpartition(".")[0])
    D = head_dim_of(fam, attn, c.model.config)
    if fam.qkv:
        rows = c.param(f"{lp}.{fam.qkv}").shape[c.dim("out")]
        K = kv_heads_of(fam, attn, c.model.config, rows // (3 * D))
        H = rows // D - 2 * K
    else:
        H = c.param(f"{lp}.{fam.q}").shape[c.dim("out")] // D
        K = c.param(f"{lp}.{fam.k}").shape[c.dim("out")] // D
    G = H // K
    if K == H or heads == "kv_group":
        kind = "head" if K == H else "kv_group"
        q_heads = [list(range(u * G, (u + 1) * G)) for u in range(K)]
        kv_heads = [[u] for u in range(K)]
    else:  # query_head: unit j = the j-th query head of every KV group; every KV head stays
        kind = "query_head"
        q_heads = [[k * G + j for k in range(K)] for j in range(G)]
        kv_heads = [[] for _ in range(G)]
    qu = torch.stack([_ranges(h, D) for h in q_heads])
    members: list[Member] = []
    if fam.qkv and fam.qkv_per_head:  # [H, 3, D] rows: head h is rows h*3D .. (h+1)*3D (MHA)
        members += c.linear(f"{lp}.{fam.qkv}", "out", torch.stack([_ranges(q, 3 * D) for q in q_heads]))
    elif fam.qkv:
        fused = [torch.cat([_ranges(q, D), _ranges(kv, D, H * D), _ranges(kv, D, (H + K) * D)])
                 for q, kv in zip(q_heads, kv_heads)]
        members += c.linear(f"{lp}.{fam.qkv}", "out", torch.stack(fused))
    else:
        members += c.linear(f"{lp}.{fam.q}", "out", qu)
        if kind != "query_head":
            kvu = torch.stack([_ranges(h, D) for h in kv_heads])
            members += c.linear(f"{lp}.{fam.k}", "out", kvu) + c.linear(f"{lp}.{fam.v}", "out", kvu)
    members += _qk_norms(c, f"{lp}.{fam.attn}", D, q_heads, kv_heads if kind != "query_head" else None)
    members += c.linear(f"{lp}.{fam.o}", "in", qu)
    meta = dict(head_dim=D, heads=H, kv_heads=K, query_heads_per_unit=len(q_heads[0]),
                kv_heads_per_unit=len(kv_heads[0]),
                unit=("KV head u with its query heads" if kind == "kv_group" else
                      "head u (MHA)" if kind == "head" else
                      "query head u inside every KV group (query heads u, G+u, 2G+u, ...; G = heads/kv_heads)"))
    return [Group(f"layers.{i}.{kind}", kind, len(q_heads), members, layer=i, meta=meta)]


def _qk_norms(c: _Ctx, ap: str, D: int, q_heads: list, kv_heads: list | None) -> list[Member]:
    """q_norm/k_norm weights that hold one slice per head, by shape: ``[H*D]`` (OLMo 2, over the whole
    projection) cut by head ranges, ``[H, D]`` (Cohere) by head rows. ``[D]`` (Qwen3, Gemma 3: one
    weight shared by all heads) is no member."""
    out = []
    for name, heads in (("q_norm", q_heads), ("k_norm", kv_heads)):
        w = c.param(f"{ap}.{name}")
        if heads is None or not isinstance(w, torch.Tensor) or (w.ndim == 1 and w.shape[0] == D):
            continue
        units = torch.stack([_ranges(h, D) for h in heads]) if w.ndim == 1 else torch.tensor(heads)
        out += c.norm(f"{ap}.{name}", units)
    return out


def _mlp_group(c: _Ctx, i: int, lp: str) -> list[Group]:
    fam = c.fam
    if fam.gate_up:
        W = c.param(f"{lp}.{fam.gate_up}")
        if W is None:
            return []
        n = W.shape[c.dim("out")] // 2
        u = torch.arange(n).view(n, 1)
        members = c.linear(f"{lp}.{fam.gate_up}", "out", torch.cat([u, u + n], 1))
    else:
        first = fam.gate or fam.fc1
        W = c.param(f"{lp}.{first}")
        if W is None:
            return []
        n = W.shape[c.dim("out")]
        u = torch.arange(n).view(n, 1)
        members = [m for p in (fam.gate, fam.up, fam.fc1) if p for m in c.linear(f"{lp}.{p}", "out", u)]
    members += c.linear(f"{lp}.{fam.mlp_out}", "in", u)
    return [Group(f"layers.{i}.mlp_channel", "mlp_channel", n, members, layer=i, meta={"gated": not fam.fc1})]


def _hidden_group(c: _Ctx, layer_paths: list[str]) -> Group:
    fam, model = c.fam, c.model
    emb = model.get_input_embeddings()
    d = emb.weight.shape[1]
    if getattr(getattr(c.base, "decoder", None), "project_in", None) is not None:
        raise ValueError("group 'hidden': OPT with project_in/project_out (word_embed_proj_dim != hidden_size) "
                         "is not supported")
    u = torch.arange(d).view(d, 1)
    members = [Member(c.name(p), 1, u, role="embed") for p in fam.embeds if c.param(p) is not None]
    for p in fam.final_norms:
        members += c.norm(p, u)
    for lp in layer_paths:
        for p in fam.attn_norms + fam.mlp_norms + fam.block_norms:
            members += c.norm(f"{lp}.{p}", u)
        for p in (fam.q, fam.k, fam.v, fam.qkv, fam.gate, fam.up, fam.gate_up, fam.fc1):
            if p:
                members += c.linear(f"{lp}.{p}", "in", u)
        for p in (fam.o, fam.mlp_out):
            members += c.linear(f"{lp}.{p}", "out", u)
    for p in fam.extra_square:
        members += c.linear(p, "out", u) + c.linear(p, "in", u)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if head is not None and not tied:
        name = next(n for n, m in model.named_modules() if m is head)
        members.append(Member(f"{name}.weight", 1, u, role="in"))
    return Group("hidden", "hidden", d, members, meta={"tied_embeddings": tied, "norm": fam.norm})


def _whole(c: _Ctx, paths: list[str]) -> tuple[list[str], list[Member]]:
    """(full module names still present, one ``whole`` member per parameter under them)."""
    names = [c.prefix + p for p in paths if not _is_dropped(_get(c.base, p))]
    members = [Member(f"{n}.{pn}", 0, torch.zeros(1, 0, dtype=torch.long), role="whole")
               for n in names for pn, _ in c.model.get_submodule(n).named_parameters()]
    return names, members


def _depth_groups(c: _Ctx, i: int, lp: str) -> list[Group]:
    """A whole block, and (pre-norm families) its attention or MLP sublayer with the norms feeding it.

    ``meta["outputs"]``: the parameters writing into the residual stream (zeroed by ``mask_``).
    """
    fam = c.fam

    def outputs(p: str) -> list[str]:
        return [c.name(f"{lp}.{p}", a) for a in ("weight", "bias") if c.param(f"{lp}.{p}", a) is not None]

    _, layer_ms = _whole(c, [lp])
    groups = [Group(f"layers.{i}.layer", "layer", 1, layer_ms, layer=i, module=c.prefix + lp,
                    meta={"outputs": outputs(fam.o) + outputs(fam.mlp_out)})]
    if not fam.prenorm:
        return groups
    for kind, mods, norms, out in (("attn_sublayer", (fam.attn,), fam.attn_norms, fam.o),
                                   ("mlp_sublayer", fam.mlp, fam.mlp_norms, fam.mlp_out)):
        names, ms = _whole(c, [f"{lp}.{m}" for m in mods])
        if not names:
            continue
        norm_names, norm_ms = _whole(c, [f"{lp}.{m}" for m in norms])
        groups.append(Group(f"layers.{i}.{kind}", kind, 1, ms + norm_ms, layer=i, module=names[0],
                            meta={"modules": names, "norms": norm_names, "outputs": outputs(out)}))
    return groups


def build_graph(model: nn.Module, fam: Family, heads: str = "kv_group") -> StructureGraph:
    """All groups of a supported family. See the module docstring."""
    if heads not in HEAD_MODES:
        raise ValueError(f"heads: expected one of {HEAD_MODES}, got {heads!r}")
    c = _Ctx(model, fam)
    layers = _get(c.base, fam.layers)
    if layers is None:
        raise ValueError(f"{fam.name}: no module {fam.layers!r} (unsupported variant of the family)")
    paths = [f"{fam.layers}.{i}" for i in range(len(layers))]
    refused = dict(fam.refused)
    groups: list[Group] = []
    for i, lp in enumerate(paths):
        groups += ([] if "heads" in refused else _attn_groups(c, i, lp, heads)) + _mlp_group(c, i, lp)
    groups.append(_hidden_group(c, paths))
    for i, lp in enumerate(paths):
        groups += _depth_groups(c, i, lp)
    params, mods = dict(model.named_parameters()), dict(model.named_modules())
    for g in groups:
        g.params_per_unit, g.macs_per_unit = _count(params, mods, g.members)
        if g.kind == "hidden" and g.meta["tied_embeddings"]:  # the tied LM head is a matmul too
            g.macs_per_unit += model.get_output_embeddings().weight.shape[0]
    total_params = sum(p.numel() for p in model.parameters())
    total_macs = sum(m.weight.numel() for m in model.modules() if _is_matmul(m))
    return StructureGraph(fam.name, groups, total_params, total_macs,
                          meta={"heads": heads, "num_layers": len(paths), "prefix": c.prefix, "refused": refused,
                                "layers": c.prefix + fam.layers, "shapes": shapes_of(params)})


def shapes_of(params: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes the graph was built for (``prune_`` refuses a stale graph)."""
    return {n: tuple(p.shape) for n, p in params.items()}
