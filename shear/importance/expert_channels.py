"""Intermediate channels of every routed expert (and of Qwen2-MoE's shared expert), scored from the calibration
tokens that reach that expert (math; the one hooked pass is :func:`shear.importance.experts.forward_blocks`).

    stats = collect_channel_stats(model, ids)                    # {layer: BlockChannels}, one pass
    scores, fallback = channel_scores(stats[l].routed, down, gate_up, "wanda")   # [E, I], experts on weights

The statistic is expert e's down-projection input ``a = act(x W_gate^T) * (x W_up^T)`` ``[n_e, I]`` over the
``n_e`` tokens the stock routing sends to it (softmax, top-k, renormalised as the family does:
:func:`shear.importance.experts.route`). With ``weighted`` each token's row is scaled by its routing weight
``w`` first: the expert's output enters the block as ``w * E_e(x)``, so ``w a_j W_down[:, j]`` is channel j's
exact share of the block output. The shared expert is a dense MLP that sees every token, scaled by
``sigmoid(shared_expert_gate(x))`` (its routing weight).

Criteria, per expert (channels compete only inside their expert; each expert keeps the same count):
- ``wanda``: Wanda-sp (An et al. 2024, "FLAP", the structured Wanda of Sun et al. 2023):
  ``||a_j||_2 * mean_i |W_down[i, j]|``;
- ``flap``: FLAP's fluctuation metric (An et al. 2024, eq. 5): ``Var_t(a_tj) * ||W_down[:, j]||_2^2``. Without
  FLAP's bias compensation: the stock experts have no down-projection bias to hold the removed channels' mean;
- ``magnitude``: ``||W_gate[j]||_2 * ||W_up[j]||_2 * ||W_down[:, j]||_2`` (weights only). It is also the
  fallback of an expert that too few calibration tokens reached (none for wanda, fewer than 2 for flap's
  variance); :func:`channel_scores` returns those experts so the report names them;
- ``random``: a seeded control (no calibration).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shear.importance.criteria import flap_columns, wanda_columns
from shear.importance.experts import MoeBlock, find_moe_blocks, forward_blocks, route

CHANNEL_CRITERIA = ("wanda", "flap", "magnitude", "random")
#: calibration tokens an expert needs before its criterion is computed from them (else: magnitude)
MIN_TOKENS = {"wanda": 1, "flap": 2}


@dataclass
class ChannelStats:
    """Down-projection input sums of E experts over the tokens routed to each (fp64): ``count [E]``;
    ``x_sum``, ``x_sqsum [E, I]`` of ``a``; ``w_sum``, ``w_sqsum [E, I]`` of ``w * a``."""

    count: torch.Tensor
    x_sum: torch.Tensor
    x_sqsum: torch.Tensor
    w_sum: torch.Tensor
    w_sqsum: torch.Tensor

    @classmethod
    def zeros(cls, n_experts: int, width: int) -> "ChannelStats":
        z = lambda: torch.zeros(n_experts, width, dtype=torch.float64)  # noqa: E731
        return cls(torch.zeros(n_experts, dtype=torch.float64), z(), z(), z(), z())

    def add_(self, e: int, a: torch.Tensor, w: torch.Tensor) -> None:
        """Add expert ``e``'s down-projection inputs ``a [n, I]`` with routing weights ``w [n]``."""
        a = a.double()
        aw = a * w.double()[:, None]
        self.count[e] += a.shape[0]
        self.x_sum[e] += a.sum(0).cpu()
        self.x_sqsum[e] += a.pow(2).sum(0).cpu()
        self.w_sum[e] += aw.sum(0).cpu()
        self.w_sqsum[e] += aw.pow(2).sum(0).cpu()


@dataclass
class BlockChannels:
    """One sparse layer's statistics: the routed experts', and the shared expert's (``[1, I_s]``) or None."""

    routed: ChannelStats
    shared: ChannelStats | None


def down_input(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s down-projection input on tokens ``x [n, H]`` -> ``[n, I]`` (the stock fused SwiGLU)."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def shared_expert_of(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(shared_expert, shared_expert_gate)`` of a Qwen2-MoE block, None where the block has none."""
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        return None
    gate = getattr(block, "shared_expert_gate", None)
    if not all(isinstance(getattr(shared, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
            or not isinstance(gate, nn.Linear):
        raise ValueError(f"{type(shared).__name__}: not a gated gate/up/down MLP with a shared_expert_gate")
    return shared, gate


def accumulate_block_(st: BlockChannels, b: MoeBlock, x: torch.Tensor) -> None:
    """Add the block input tokens ``x [N, H]`` to ``st``: each routed expert on the tokens it is routed to."""
    w, idx = route(F.linear(x, b.router.weight), b.top_k, b.normalize)
    for e in idx.unique().tolist():
        rows, slots = torch.where(idx == e)
        st.routed.add_(e, down_input(b.experts, e, x[rows]).float(), w[rows, slots])
    if st.shared is not None:
        shared, gate = shared_expert_of(b.block)
        a = shared.act_fn(shared.gate_proj(x)) * shared.up_proj(x)
        st.shared.add_(0, a.float(), torch.sigmoid(gate(x).float()).squeeze(-1))


def collect_channel_stats(model: nn.Module, ids: torch.Tensor | None, batch_size: int = 8) -> dict[int, BlockChannels]:
    """``{layer: BlockChannels}`` from one pass over ``ids [n, L]`` (None: empty, for the random criterion)."""
    stats = {}
    for b in find_moe_blocks(model):
        sh = shared_expert_of(b.block)
        stats[b.layer] = BlockChannels(ChannelStats.zeros(b.num_experts, b.experts.down_proj.shape[-1]),
                                       None if sh is None else ChannelStats.zeros(1, sh[0].down_proj.in_features))
    if ids is not None:
        forward_blocks(model, ids, lambda b, x: accumulate_block_(stats[b.layer], b, x), batch_size)
    return stats


def magnitude(down: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """``||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||`` of ``down [E, H, I]``, ``gate_up [E, 2I, H]``
    -> ``[E, I]``."""
    g, u = gate_up.float().chunk(2, dim=1)
    return (g.norm(dim=-1) * u.norm(dim=-1) * down.float().norm(dim=1)).double().cpu()


def channel_scores(st: ChannelStats, down: torch.Tensor, gate_up: torch.Tensor, criterion: str,
                   weighted: bool = True, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``(scores [E, I] fp64, higher = keep; experts scored by magnitude for want of tokens)`` from ``st`` and
    the experts' ``down [E, H, I]`` / ``gate_up [E, 2I, H]`` (a dense MLP: ``E = 1``). ``seed``: random only."""
    if criterion not in CHANNEL_CRITERIA:
        raise ValueError(f"expert channel criterion {criterion!r}: expected one of {', '.join(CHANNEL_CRITERIA)}")
    n_exp, width = down.shape[0], down.shape[-1]
    if criterion == "random":
        return torch.rand(n_exp, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), []
    out = magnitude(down, gate_up)
    if criterion == "magnitude":
        return out, []
    s, sq = (st.w_sum, st.w_sqsum) if weighted else (st.x_sum, st.x_sqsum)
    fallback = [e for e in range(n_exp) if st.count[e] < MIN_TOKENS[criterion]]
    with torch.no_grad():
        for e in sorted(set(range(n_exp)) - set(fallback)):
            w = down[e]  # [H, I]: out x in
            col = (wanda_columns(w, sq[e]) if criterion == "wanda"
                   else flap_columns(w, s[e], sq[e], int(st.count[e])))
            out[e] = col.double().cpu()
    return out, fallback
