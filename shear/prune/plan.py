"""Plans: from scores and a target to a :class:`PrunePlan` (which units of which groups go).

Targets (``PruneConfig.target``): a ratio of PARAMETERS, a parameter budget, or an explicit shape.
For ratio/budget targets every structure in ``structures`` (heads, mlp, hidden, layers) loses the
same fraction ``f`` of its units, unless ``structure_ratios`` fixes its fraction; ``f`` is found by
bisection so that the exact parameter count after removal (:class:`ParamCounter`, which accounts
for overlaps such as a q_proj row that also loses hidden columns) is at most the target.

Allocation inside a structure: ``uniform`` gives every layer the same kept width (rounded to
``round_to``); ``balanced`` is uniform too, but heads and MLP channels do not lose the same fraction:
every head count per layer that the stock config allows is tried, the MLP width solved for the
target, and the split whose removed units carry the least summed score wins (scores on one scale:
OBS's ``ΔE`` and FLAP's output variance are both the squared error a unit's removal adds to the
residual stream); ``global`` ranks units of all (unprotected) layers together by score, so widths
differ per layer, then rounds each layer's kept width to ``round_to``. Layers are always ranked
globally. Within a group the lowest-scored units go.
"""
from __future__ import annotations

import math

import torch

from shear.analyze.graph import PrunePlan, StructureGraph

STRUCTURE_KINDS = {"heads": ("head", "kv_group", "query_head"), "mlp": ("mlp_channel",),
                   "hidden": ("hidden",), "layers": ("layer",)}


class ParamCounter:
    """Exact parameter count of the model after removing ``n`` units from groups.

    Built from the graph and ``{param name: shape}``; a parameter loses ``n * width`` along each
    dim a removed group indexes, and disappears when a depth group holding it is removed.
    """

    def __init__(self, graph: StructureGraph, shapes: dict[str, tuple[int, ...]]):
        self.graph, self.shapes = graph, shapes
        self.dims: dict[str, list[list[tuple[str, int]]]] = {p: [[] for _ in s] for p, s in shapes.items()}
        self.depth: dict[str, list[str]] = {p: [] for p in shapes}
        self.out_dim: dict[str, int] = {}  # weight -> its output dim (1 for GPT-2's Conv1D)
        for g in graph.groups:
            for m in g.members:
                if m.param not in shapes:
                    continue
                if m.role == "out":
                    self.out_dim[m.param] = m.dim
                if m.width == 0:
                    self.depth[m.param].append(g.name)
                else:
                    self.dims[m.param][m.dim].append((g.name, m.width))

    def count(self, removed: dict[str, int]) -> int:
        total = 0
        for p, shape in self.shapes.items():
            if any(removed.get(g, 0) for g in self.depth[p]):
                continue
            n = 1
            for d, size in enumerate(shape):
                n *= max(size - sum(removed.get(g, 0) * w for g, w in self.dims[p][d]), 0)
            total += n
        return total


def model_shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _round_keep(keep: float, n: int, align: int, min_keep: int) -> int:
    """Kept units: nearest multiple of ``align`` (``n`` itself when nothing goes), in [min_keep, n]."""
    if keep >= n:
        return n
    k = int(math.floor(keep / align + 0.5)) * align
    return max(min(k, n), min_keep, min(align, n))


class _Planner:
    def __init__(self, graph: StructureGraph, scores: dict, cfg):
        self.graph, self.scores, self.cfg = graph, scores, cfg
        self.groups = {s: [g for g in graph.groups if g.kind in kinds] for s, kinds in STRUCTURE_KINDS.items()}

    def _free(self, gs):
        return [g for g in gs if not self.cfg.is_protected(g.layer)]

    def _align(self, structure: str) -> int:
        if structure == "hidden":
            return math.lcm(self.cfg.round_to, self._hidden_multiple())
        return self.cfg.round_to if structure == "mlp" else 1

    def _stock_heads(self, g, keep: int) -> int:
        """Uniform head plans on families whose stock config needs hidden % heads == 0 (Llama, Gemma2):
        the nearest kept unit count whose query heads divide the hidden size (ties: fewer), so the
        export stays the stock class. Other families: ``keep`` unchanged."""
        from shear.analyze.families import FAMILIES

        fam = FAMILIES.get(self.graph.family)
        hidden = next((h.num_units for h in self.graph.groups if h.kind == "hidden"), None)
        if fam is None or not fam.hidden_per_head or not hidden or keep >= g.num_units:
            return keep
        q = g.meta.get("query_heads_per_unit", 1)
        ok = [k for k in range(max(self.cfg.min_keep, 1), g.num_units + 1) if hidden % (k * q) == 0]
        return min(ok, key=lambda k: (abs(k - keep), k)) if ok else keep

    def _hidden_multiple(self) -> int:
        """Head count when the family's stock config requires hidden % heads == 0 (else 1)."""
        from shear.analyze.families import FAMILIES

        fam = FAMILIES.get(self.graph.family)
        if fam is None or not fam.hidden_per_head:
            return 1
        heads = [g.meta.get("heads") for g in self.graph.groups if g.kind in STRUCTURE_KINDS["heads"]]
        return heads[0] if heads and all(h == heads[0] for h in heads) and heads[0] else 1

    def counts(self, structure: str, f: float) -> dict[str, int]:
        """Units removed per group of ``structure`` when a fraction ``f`` of its units goes."""
        gs = self._free(self.groups[structure])
        if f <= 0 or not gs:
            return {}
        if structure == "layers":
            n = min(int(math.floor(f * len(gs) + 1e-9)), len(self.groups["layers"]) - 1)
            order = sorted(gs, key=lambda g: (float(self._score(g)[0]), g.layer))
            return {g.name: 1 for g in order[:n]}
        align, mk = self._align(structure), self.cfg.min_keep
        if self.cfg.allocation in ("uniform", "balanced") or len(gs) == 1:
            keep = {g.name: _round_keep(g.num_units * (1 - f), g.num_units, align, mk) for g in gs}
            if structure == "heads":
                keep = {n: self._stock_heads(self.graph[n], k) for n, k in keep.items()}
            return {g.name: g.num_units - keep[g.name] for g in gs}
        pool = torch.cat([self._score(g) for g in gs])
        owner = torch.cat([torch.full((g.num_units,), i) for i, g in enumerate(gs)])
        want = int(math.floor(f * pool.numel() + 0.5))
        taken = [0] * len(gs)
        for idx in torch.argsort(pool, stable=True).tolist():
            if want == 0:
                break
            i = int(owner[idx])
            if taken[i] < gs[i].num_units - max(mk, 1):
                taken[i] += 1
                want -= 1
        return {g.name: g.num_units - _round_keep(g.num_units - t, g.num_units, align, mk) for g, t in zip(gs, taken)}

    def _score(self, g) -> torch.Tensor:
        if g.name not in self.scores:
            raise ValueError(f"plan: no score for group {g.name!r}; score its kind ({g.kind}) first")
        return self.scores[g.name].float().cpu()

    def select(self, counts: dict[str, int]) -> dict[str, list[int]]:
        """The ``n`` lowest-scored units of each group (ties: lower unit number goes first)."""
        out = {}
        for name, n in counts.items():
            if n > 0:
                g = self.graph[name]
                out[name] = [0] if g.kind == "layer" else sorted(
                    torch.argsort(self._score(g), stable=True)[:n].tolist())
        return out


def _pool_order(p: _Planner, structures: list[str]) -> list[str]:
    """FLAP AL-AM: the groups of the pooled units in removal order (lowest score first, every group
    keeping ``min_keep`` units): unit ``k`` of the order removes one unit of group ``order[k]``."""
    gs = [g for s in structures for g in p._free(p.groups[s])]
    if not gs:
        return []
    pool = torch.cat([p._score(g) for g in gs])
    owner = torch.cat([torch.full((g.num_units,), i) for i, g in enumerate(gs)])
    taken, order = [0] * len(gs), []
    for idx in torch.argsort(pool, stable=True).tolist():
        i = int(owner[idx])
        if taken[i] < gs[i].num_units - max(p.cfg.min_keep, 1):
            taken[i] += 1
            order.append(gs[i].name)
    return order


def _pool_counts(p: _Planner, order: list[str], k: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in order[:k]:
        counts[name] = counts.get(name, 0) + 1
    out = {}
    for name, n in counts.items():
        g = p.graph[name]
        align = p._align("mlp" if g.kind == "mlp_channel" else "heads")
        out[name] = g.num_units - _round_keep(g.num_units - n, g.num_units, align, p.cfg.min_keep)
    return out


def _solve(counter, counts_at, target_params: int) -> dict[str, int] | None:
    """The least removal fraction ``f`` whose counts meet ``target_params`` (bisection), or None."""
    lo, hi = 0.0, 1.0 - 1e-6
    if counter.count(counts_at(lo)) <= target_params:
        return counts_at(lo)
    if counter.count(counts_at(hi)) > target_params:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if counter.count(counts_at(mid)) <= target_params else (mid, hi)
    return counts_at(hi)


def _balanced(p: "_Planner", counter, fixed: dict, free: list[str], target_params: int,
              equal: dict[str, int]) -> tuple[dict[str, int], int]:
    """``allocation: balanced``: the uniform plan whose split between heads and MLP channels removes the least
    summed score. For each head count ``k`` removed in every layer (counts the stock config accepts), the other
    free structures lose the fraction that meets the target; returns (counts, ``k``)."""
    heads = p._free(p.groups["heads"])
    n = min(g.num_units for g in heads)
    others = [s for s in free if s != "heads"]

    def cost(counts: dict[str, int]) -> float:
        return sum(float(torch.sort(p._score(p.graph[g]))[0][:c].sum()) for g, c in counts.items()
                   if c and p.graph[g].kind != "layer")

    best, best_cost, best_k = equal, cost(equal), None
    for k in range(0, n):
        if any(p._stock_heads(g, g.num_units - k) != g.num_units - k for g in heads):
            continue
        head_counts = {g.name: k for g in heads if k}

        def counts_at(f: float) -> dict[str, int]:
            c = dict(head_counts)
            for s, r in fixed.items():
                c.update(p.counts(s, r))
            for s in others:
                c.update(p.counts(s, f))
            return c

        c = _solve(counter, counts_at, target_params)
        if c is None:
            continue
        v = cost(c)
        if v < best_cost:
            best, best_cost, best_k = c, v, k
    if best_k is None:
        best_k = max((c for g, c in best.items() if p.graph[g].kind in STRUCTURE_KINDS["heads"]), default=0)
    return best, best_k


def _shape_counts(p: _Planner, shape) -> dict[str, int]:
    """Per-group removal counts for an explicit target shape (uniform per layer)."""
    counts: dict[str, int] = {}

    def keep_all(structure, keep_fn):
        for g in p._free(p.groups[structure]):
            k = keep_fn(g)
            if k is None:
                continue
            if not 0 < k <= g.num_units:
                raise ValueError(f"prune.target.shape: {g.name} has {g.num_units} units; cannot keep {k}")
            counts[g.name] = g.num_units - k

    if shape.intermediate_size is not None:
        keep_all("mlp", lambda g: shape.intermediate_size)
    if shape.hidden_size is not None:
        keep_all("hidden", lambda g: shape.hidden_size)

    def heads_keep(g):
        m = g.meta
        if g.kind == "head":
            return shape.num_attention_heads or shape.num_key_value_heads
        if g.kind == "kv_group":
            if shape.num_key_value_heads is not None:
                return shape.num_key_value_heads
            if shape.num_attention_heads is not None:
                q = m.get("query_heads_per_unit", 1)
                if shape.num_attention_heads % q:
                    raise ValueError(f"prune.target.shape.num_attention_heads: must be a multiple of {q} "
                                     "(query heads per KV group) with heads='kv_group'")
                return shape.num_attention_heads // q
            return None
        if shape.num_key_value_heads is not None and shape.num_key_value_heads != m.get("kv_heads"):
            raise ValueError("prune.target.shape.num_key_value_heads: heads='query_head' keeps every KV head")
        if shape.num_attention_heads is None:
            return None
        k = m.get("kv_heads", 1)
        if shape.num_attention_heads % k:
            raise ValueError(f"prune.target.shape.num_attention_heads: must be a multiple of {k} (KV heads)")
        return shape.num_attention_heads // k

    keep_all("heads", heads_keep)
    if shape.num_hidden_layers is not None:
        n_layers = len(p.groups["layers"])
        drop = n_layers - shape.num_hidden_layers
        if drop < 0:
            raise ValueError(f"prune.target.shape.num_hidden_layers: the model has {n_layers} layers")
        free = p._free(p.groups["layers"])
        if drop:
            counts.update(p.counts("layers", (drop + 0.5) / max(len(free), 1)))
    return counts


def check_protection(graph: StructureGraph, cfg) -> None:
    """``protected_layers`` must name layers that exist; hidden channels cannot be protected (warned)."""
    n = graph.meta.get("num_layers")
    if n is None:
        n = 1 + max((g.layer for g in graph.groups if g.layer is not None), default=-1)
    if isinstance(cfg.protected_layers, str):
        if cfg.protected_layers and not any(cfg.is_protected(i) for i in range(n)):
            raise ValueError(f"prune.protected_layers: regex {cfg.protected_layers!r} matches none of the "
                             f"model's layers 0..{n - 1}")
    else:
        bad = sorted(i for i in cfg.protected_layers if not 0 <= i < n)
        if bad:
            raise ValueError(f"prune.protected_layers: {bad} do not exist (the model has layers 0..{n - 1})")
    shrinks_hidden = "hidden" in cfg.structures or "hidden" in cfg.structure_ratios or (
        cfg.target.shape is not None and cfg.target.shape.hidden_size is not None)
    if cfg.protected_layers and shrinks_hidden:
        import logging

        logging.getLogger("shear").warning(
            "prune.protected_layers: hidden channels are shared by every layer, so pruning 'hidden' slices the "
            "protected layers too (their heads, MLP channels and the layers themselves stay)")


def build_plan(graph: StructureGraph, scores: dict[str, torch.Tensor], cfg, shapes: dict[str, tuple[int, ...]],
               target_params: int | None = None) -> PrunePlan:
    """A :class:`PrunePlan` meeting ``cfg.target`` (or ``target_params`` when given, for iterative steps).

    ``scores``: ``{group name: [num_units]}`` for every group a structure may shrink; ``shapes``:
    ``{param: shape}`` of the model the graph describes.
    """
    p = _Planner(graph, scores, cfg)
    counter = ParamCounter(graph, shapes)
    before = counter.count({})
    check_protection(graph, cfg)
    meta = {"params_before": before, "allocation": cfg.allocation, "round_to": cfg.round_to}
    if cfg.target.shape is not None and target_params is None:
        counts = _shape_counts(p, cfg.target.shape)
    else:
        if target_params is None:
            target_params = (int(before * (1 - cfg.target.ratio)) if cfg.target.ratio is not None
                             else cfg.target.params)
            if target_params >= before:
                raise ValueError(f"prune.target.params: {target_params:,} is not below the model's {before:,} "
                                 "parameters; nothing would be pruned")
        fixed = dict(cfg.structure_ratios)
        free = [s for s in cfg.structures if s not in fixed and p.groups[s]]
        missing = [s for s in cfg.structures if s not in fixed and not p.groups[s]]
        if missing:
            import logging

            logging.getLogger("shear").warning(
                "prune.structures: the analysis found no %s groups in this model%s, so they are not pruned; "
                "the target is met with %s", "/".join(missing),
                " (no family entry: the generic analyzer does not group attention heads; not Llama-shaped: "
                f"{graph.meta.get('misfit') or 'unknown'})"
                if graph.meta.get("skipped_attention") else "", "/".join(free) or "nothing")
            meta["structures_not_found"] = missing
        pooled = [s for s in free if s in ("heads", "mlp")] if cfg.allocation == "pool" else []
        order = _pool_order(p, pooled)

        def counts_at(f: float) -> dict[str, int]:
            c: dict[str, int] = {}
            for s, r in fixed.items():
                c.update(p.counts(s, r))
            for s in free:
                if s not in pooled:
                    c.update(p.counts(s, f))
            if pooled:  # f is the share of the pool removed
                c.update(_pool_counts(p, order, int(math.floor(f * len(order) + 1e-9))))
            return c

        lo, hi = 0.0, 1.0 - 1e-6
        if free and counter.count(counts_at(lo)) > target_params:
            if counter.count(counts_at(hi)) > target_params:
                raise ValueError(f"prune.target: {target_params} parameters cannot be reached by shrinking "
                                 f"{free} (min_keep={cfg.min_keep}, protected={cfg.protected_layers})")
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if counter.count(counts_at(mid)) <= target_params else (mid, hi)
            f = hi
        else:
            f = 0.0
        counts = counts_at(f)
        meta.update(fraction=f, target_params=target_params)
        if cfg.allocation == "balanced" and "heads" in free and "mlp" in free:
            counts, meta["heads_removed_per_layer"] = _balanced(p, counter, fixed, free, target_params, counts)
    meta["params_after"] = counter.count(counts)
    meta["removed_ratio"] = 1 - meta["params_after"] / before
    return PrunePlan(remove=p.select(counts), meta=meta)
