"""Mixture-of-experts layers: find the router and experts of each sparse block, replay the stock routing,
and score whole experts from calibration routing (math; the hooks are in :func:`collect_expert_stats`).

    blocks = find_moe_blocks(model)                        # one MoeBlock per sparse layer
    stats = collect_expert_stats(model, ids)               # one pass, forward hooks on the blocks
    scores = expert_scores(stats, "reconstruction")        # {layer: FloatTensor[E]}, higher = keep

Families (``MOE_FAMILIES``): Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE. transformers 5 stores their experts
fused, ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``; any other storage
is refused. The router is ``gate.weight [E, H]`` without bias; routing is
``softmax(x W^T)`` in fp32, top-k, and the top-k weights renormalised to sum to 1 when the family always
does so (Mixtral) or ``config.norm_topk_prob`` is set. Qwen2-MoE's shared expert is a dense MLP beside the
routed ones: it is never scored nor removed here (dropping a routed expert leaves its output unchanged); its
channels are pruned with the routed experts' by :mod:`shear.importance.expert_channels`.
Layers that Qwen's ``mlp_only_layers`` / ``decoder_sparse_step`` make dense have no block here.

Criteria, per layer, over the calibration tokens ``n`` (``count_e``: tokens with e in their top-k):
- ``frequency``: ``count_e / n`` (the hard count of SEER-MoE's heavy hitters, Muzio et al. 2024);
- ``weighted``: ``count_e / n * mean routing weight of e * mean ||E_e(x)||`` over those tokens (a soft
  count, with the expert's output norm as the size of what it contributes);
- ``reconstruction``: the increase of the block's routed output error ``sum_t ||y'_t - y_t||^2 /
  sum_t ||y_t||^2`` when e alone is dropped and the router renormalised over the others (its logit at
  -inf: the token's next-best expert takes its slot, weights as the stock code computes them; without
  renormalisation the tokens not routed to e change too, their top-k weights grow by ``1 / (1 - p_e)``,
  and count). One expert at a time: neither greedy nor the search over kept subsets of Lu et al. 2024
  ("Not All Experts are Equal", which minimises this error for the whole set). It streams in the single
  pass (only a token's top-k+1 experts run) and stores no activations; interactions between removed
  experts are not seen;
- ``random``: a seeded control (no calibration).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: model_type -> (config key counting the experts of a layer, how the top-k weights are normalised:
#: "always" or the config attribute that switches it)
MOE_FAMILIES = {
    "mixtral": ("num_local_experts", "always"),
    "olmoe": ("num_experts", "norm_topk_prob"),
    "qwen2_moe": ("num_experts", "norm_topk_prob"),
    "qwen3_moe": ("num_experts", "norm_topk_prob"),
}
CRITERIA = ("frequency", "weighted", "reconstruction", "random")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoeBlock:
    """One sparse block: its path, decoder layer, router (``gate``), experts and routing settings."""

    path: str
    layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    normalize: bool


def _family(model: nn.Module) -> tuple[str, tuple[str, str]]:
    mt = getattr(model.config, "model_type", None)
    if mt not in MOE_FAMILIES:
        raise ValueError(f"{type(model).__name__} (model_type {mt!r}): expert pruning supports "
                         f"{', '.join(sorted(MOE_FAMILIES))}")
    return mt, MOE_FAMILIES[mt]


def num_experts_of(experts: nn.Module) -> int:
    """How many experts ``experts`` holds (fused ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3:
        return gu.shape[0]
    raise ValueError(f"{type(experts).__name__}: not fused gate_up_proj [E, 2I, H] / down_proj [E, H, I]")


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every sparse block of ``model`` (modules with a router ``gate`` whose weight is ``[E, H]`` and
    ``experts`` holding E experts), in layer order. Refuses an unsupported family or a model without one."""
    mt, (_, norm) = _family(model)
    cfg = model.config
    normalize = True if norm == "always" else bool(getattr(cfg, norm))
    out = []
    for path, mod in model.named_modules():
        router, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
        w = getattr(router, "weight", None)
        if not isinstance(router, nn.Module) or experts is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if getattr(router, "bias", None) is not None:
            raise ValueError(f"{path}.gate has a bias; the {mt} router has none")
        n = num_experts_of(experts)
        if w.shape[0] != n:
            raise ValueError(f"{path}: router has {w.shape[0]} rows for {n} experts")
        m = _LAYER.search(path + ".")
        if m is None:
            raise ValueError(f"{path}: a sparse block outside model.layers.N")
        top_k = int(getattr(router, "top_k", None) or cfg.num_experts_per_tok)
        out.append(MoeBlock(path, int(m.group(1)), mod, router, experts, n, top_k, normalize))
    if not out:
        raise ValueError(f"{type(model).__name__}: no sparse block (gate + experts) found")
    return sorted(out, key=lambda b: b.layer)


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock routing of ``logits [N, E]``: ``(weights [N, k] fp32, indices [N, k])``."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on tokens ``x [n, H]`` -> ``[n, H]``: the stock fused SwiGLU."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@dataclass
class ExpertStats:
    """Routing statistics of one block over the calibration tokens (fp64 sums, per expert ``[E]``)."""

    count: torch.Tensor
    weight_sum: torch.Tensor
    norm_sum: torch.Tensor
    drop_err: torch.Tensor
    out_sqsum: float = 0.0
    tokens: int = 0
    top_k: int = 0

    @classmethod
    def zeros(cls, n: int, top_k: int) -> "ExpertStats":
        z = lambda: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z(), top_k=top_k)


def accumulate_(stats: ExpertStats, x: torch.Tensor, logits: torch.Tensor, experts: nn.Module,
                normalize: bool) -> None:
    """Add the tokens ``x [N, H]`` routed by ``logits [N, E]`` to ``stats`` (see the module docstring).

    Only each token's top-(k+1) experts run: dropping one of its top-k moves the (k+1)-th into the set.
    """
    n_exp, k = logits.shape[-1], stats.top_k
    kk = min(k + 1, n_exp)
    probs = torch.softmax(logits.float(), dim=-1)
    p, idx = torch.topk(probs, kk, dim=-1)  # [N, kk], best first
    out = torch.zeros(x.shape[0], kk, x.shape[-1], dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        rows, slots = torch.where(idx == e)
        out[rows, slots] = expert_forward(experts, e, x[rows]).float()
    w = p[:, :k] / p[:, :k].sum(-1, keepdim=True) if normalize else p[:, :k]
    y = torch.einsum("nk,nkh->nh", w, out[:, :k])
    top = idx[:, :k].reshape(-1).cpu()
    ones = torch.ones_like(top, dtype=torch.float64)
    stats.count.index_add_(0, top, ones)
    stats.weight_sum.index_add_(0, top, w.reshape(-1).double().cpu())
    stats.norm_sum.index_add_(0, top, out[:, :k].norm(dim=-1).reshape(-1).double().cpu())
    for i in range(k):  # drop the expert in slot i: the others keep their order, slot k moves in
        sel = [s for s in range(kk) if s != i][:k]
        pn = p[:, sel]
        wn = pn / pn.sum(-1, keepdim=True) if normalize else pn / (1 - p[:, i:i + 1]).clamp_min(1e-12)
        err = (torch.einsum("nk,nkh->nh", wn, out[:, sel]) - y).pow(2).sum(-1)
        stats.drop_err.index_add_(0, idx[:, i].cpu(), err.double().cpu())
    y2 = y.double().pow(2).sum(-1)
    if not normalize:  # e's softmax mass goes to the others: every token not routed to e is scaled by 1/(1-p_e)
        pd = probs.double()
        grow = (pd / (1 - pd).clamp_min(1e-12)).pow(2).scatter(1, idx[:, :k], 0.0)
        stats.drop_err += (y2[:, None] * grow).sum(0).cpu()
    stats.out_sqsum += float(y2.sum())
    stats.tokens += x.shape[0]


def expert_scores(stats: dict[int, ExpertStats], criterion: str, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: scores [E]}`` (fp64, higher = more important) by ``criterion`` (one of ``CRITERIA``)."""
    if criterion not in CRITERIA:
        raise ValueError(f"expert criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")
    out = {}
    for layer, s in stats.items():
        if criterion == "random":
            g = torch.Generator().manual_seed(seed * 100_003 + layer)
            out[layer] = torch.rand(s.count.numel(), generator=g, dtype=torch.float64)
            continue
        if s.tokens == 0:
            raise ValueError(f"layer {layer}: no calibration token reached its sparse block")
        freq = s.count / s.tokens
        if criterion == "frequency":
            out[layer] = freq
        elif criterion == "weighted":
            c = s.count.clamp_min(1)
            out[layer] = freq * (s.weight_sum / c) * (s.norm_sum / c)
        else:
            out[layer] = s.drop_err / max(s.out_sqsum, 1e-30)
    return out


def forward_blocks(model: nn.Module, ids: torch.Tensor, fn, batch_size: int = 8) -> None:
    """Run ``model`` over ``ids [n, L]`` in batches with a forward hook on every sparse block calling
    ``fn(block: MoeBlock, x [N, H])`` on the block's input tokens (the one calibration loop of the MoE criteria)."""
    blocks = find_moe_blocks(model)

    def hook(b: MoeBlock):
        def run(_mod, args, _out):
            fn(b, args[0].reshape(-1, args[0].shape[-1]))
        return run

    handles = [b.block.register_forward_hook(hook(b)) for b in blocks]
    dev = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(input_ids=batch.to(dev), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def collect_expert_stats(model: nn.Module, ids: torch.Tensor | None, batch_size: int = 8) -> dict[int, ExpertStats]:
    """Run ``model`` once over ``ids [n, L]`` with a forward hook on every sparse block; ``{layer: stats}``.
    ``ids=None``: empty statistics (the random criterion needs no calibration)."""
    stats = {b.layer: ExpertStats.zeros(b.num_experts, b.top_k) for b in find_moe_blocks(model)}
    if ids is not None:
        forward_blocks(model, ids, lambda b, x: accumulate_(stats[b.layer], x, F.linear(x, b.router.weight),
                                                            b.experts, b.normalize), batch_size)
    return stats
