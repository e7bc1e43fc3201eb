"""Remove the same number of intermediate channels from every routed expert of every sparse layer (each expert
its own channels), and from Qwen2-MoE's shared expert at the same ratio unless kept; the export is the stock
class with the config's expert width updated.

    report = prune_expert_channels_(model, tokenizer, ExpertChannelConfig(ratio=0.25, criterion="wanda"))

Scoring is :mod:`shear.importance.expert_channels`; here: which channels stay and the slicing, the fused
``gate_up_proj [E, 2I, H]`` (gate rows j and up rows I + j) and ``down_proj [E, H, I]`` (columns j), with the
config key updated by the same code (``EXPERT_WIDTH``). The sliced model equals the unsliced one with the
removed channels' down-projection columns at zero (the channel then adds nothing). Qwen's dense layers
(``mlp_only_layers``, width ``intermediate_size``) are no experts and stay as they are.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from shear.importance.expert_channels import channel_scores, collect_channel_stats, shared_expert_of
from shear.importance.experts import find_moe_blocks
from shear.prune.experts import ExpertCalibration

log = logging.getLogger("shear")

#: model_type -> the config key of a routed expert's intermediate width
EXPERT_WIDTH = {"mixtral": "intermediate_size", "olmoe": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                "qwen3_moe": "moe_intermediate_size"}
SHARED_WIDTH = "shared_expert_intermediate_size"


class ExpertChannelConfig(ExpertCalibration):
    """How many channels each expert loses, by which criterion, and the calibration that scores them."""

    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of every expert's intermediate channels removed "
                                                     "(floor(ratio * I), the same in every expert and layer)")
    criterion: Literal["wanda", "flap", "magnitude", "random"] = Field(
        "wanda", description="channel importance (shear.importance.expert_channels); random is a seeded control")
    routing_weight: bool = Field(True, description="scale each routed token's activations by its routing weight "
                                                   "(the shared expert's: its sigmoid gate) before the statistics")
    shared: Literal["prune", "keep"] = Field("prune", description="Qwen2-MoE's shared expert: its own channels "
                                                                  "removed at the same ratio, or left whole")

    @model_validator(mode="after")
    def _weighting_needs_activations(self):
        if not self.routing_weight and self.criterion in ("magnitude", "random"):
            raise ValueError(f"routing_weight=False: the {self.criterion} criterion reads no activations")
        return self


def channels_to_remove(width: int, ratio: float) -> int:
    """``floor(ratio * width)``; refused when it removes nothing or every channel."""
    n = math.floor(ratio * width + 1e-9)
    if n == 0 or n >= width:
        raise ValueError(f"expert channel ratio {ratio} removes {n} of {width} channels; expected 1 to {width - 1}")
    return n


def kept_channels(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Per row of ``scores [E, I]``, the ``I - n_remove`` highest, ascending -> ``[E, I - n_remove]`` (ties: the
    lower index stays)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :scores.shape[-1] - n_remove].sort(dim=-1).values


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def slice_expert_channels_(model: nn.Module, keep: dict[int, torch.Tensor],
                           shared_keep: dict[int, torch.Tensor] | None = None) -> nn.Module:
    """Keep channels ``keep[layer] [E, I']`` of every routed expert (and ``shared_keep[layer] [I_s']`` of the
    shared expert) in place; the experts' ``intermediate_dim``, the shared MLP's ``intermediate_size`` and the
    config's widths follow. One ``I'`` (and one ``I_s'``) across layers: the stock class has one."""
    blocks = find_moe_blocks(model)
    if set(keep) != {b.layer for b in blocks}:
        raise ValueError(f"keep names layers {sorted(keep)}; the sparse layers are {[b.layer for b in blocks]}")
    shared_keep = shared_keep or {}
    for name, k in (("routed", keep), ("shared", shared_keep)):
        if len({v.shape[-1] for v in k.values()}) > 1:
            raise ValueError(f"{name} expert widths differ across layers; the stock class needs one")
    for b in blocks:  # every check before the first change: a refusal leaves the model whole
        ex, idx = b.experts, keep[b.layer]
        extra = sorted({n for n, _ in ex.named_parameters()} - {"gate_up_proj", "down_proj"})
        if extra:
            raise ValueError(f"{b.path}.experts: parameters {extra} beside gate_up_proj / down_proj are not sliced")
        width = ex.down_proj.shape[-1]
        if idx.dim() != 2 or idx.shape[0] != b.num_experts or idx.numel() == 0 or idx.min() < 0 \
                or idx.max() >= width or any(row.unique().numel() != row.numel() for row in idx):
            raise ValueError(f"layer {b.layer}: kept channels {tuple(idx.shape)} are not distinct indices below "
                             f"{width} for each of {b.num_experts} experts")
        if b.layer in shared_keep:
            mlp, k = shared_expert_of(b.block)[0], shared_keep[b.layer]
            if any(lin.bias is not None for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                raise ValueError(f"{b.path}.shared_expert: a bias in its projections is not sliced")
            if k.dim() != 1 or k.numel() == 0 or k.unique().numel() != k.numel() or k.min() < 0 \
                    or k.max() >= mlp.down_proj.in_features:
                raise ValueError(f"layer {b.layer}: kept shared-expert channels are not distinct indices below "
                                 f"{mlp.down_proj.in_features}")
    if set(shared_keep) - {b.layer for b in blocks if shared_expert_of(b.block) is not None}:
        raise ValueError(f"shared_keep names layers {sorted(shared_keep)} without a shared expert")
    for b in blocks:
        ex = b.experts
        idx = keep[b.layer].to(torch.long).to(ex.down_proj.device)
        width = ex.down_proj.shape[-1]
        rows = torch.cat([idx, idx + width], dim=1)  # gate rows, then up rows
        gu = ex.gate_up_proj.data.gather(1, rows[:, :, None].expand(-1, -1, ex.gate_up_proj.shape[-1]))
        down = ex.down_proj.data.gather(2, idx[:, None, :].expand(-1, ex.down_proj.shape[1], -1))
        ex.gate_up_proj, ex.down_proj = _param(gu, ex.gate_up_proj), _param(down, ex.down_proj)
        if hasattr(ex, "intermediate_dim"):
            ex.intermediate_dim = idx.shape[1]
        if b.layer in shared_keep:
            _slice_mlp_(shared_expert_of(b.block)[0], shared_keep[b.layer])
    setattr(model.config, EXPERT_WIDTH[model.config.model_type], next(iter(keep.values())).shape[-1])
    if shared_keep:
        setattr(model.config, SHARED_WIDTH, next(iter(shared_keep.values())).numel())
    return model


def _slice_mlp_(mlp: nn.Module, idx: torch.Tensor) -> None:
    """A dense gate/up/down MLP (bias-free, checked by the caller) keeps intermediate channels ``idx [I']``."""
    idx = idx.to(torch.long).to(mlp.down_proj.weight.device)
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        lin.weight = _param(lin.weight.data.index_select(0, idx), lin.weight)
        lin.out_features = idx.numel()
    mlp.down_proj.weight = _param(mlp.down_proj.weight.data.index_select(1, idx), mlp.down_proj.weight)
    mlp.down_proj.in_features = idx.numel()
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = idx.numel()


def prune_expert_channels_(model: nn.Module, tokenizer, cfg: ExpertChannelConfig, ids: torch.Tensor | None = None,
                           data=None) -> dict:
    """Score every routed (and shared) expert's channels, remove ``floor(cfg.ratio * I)`` from each; the report.

    ``ids [n, L]`` overrides the calibration sampler (``shear.data.calibration.calibration_for``). Report per
    layer: ``tokens`` (calibration tokens routed to each expert) and ``fallback`` (experts that got too few and
    were scored by weight magnitude); ``shared``: the shared expert's widths and whether it was pruned.
    """
    t0 = time.perf_counter()
    blocks = find_moe_blocks(model)
    widths = {b.experts.down_proj.shape[-1] for b in blocks}
    if len(widths) != 1:
        raise ValueError(f"sparse layers hold experts of different widths {sorted(widths)}; expected one")
    width = widths.pop()
    n_remove = channels_to_remove(width, cfg.ratio)
    has_shared = shared_expert_of(blocks[0].block) is not None
    if cfg.shared == "keep" and not has_shared:
        raise ValueError(f"shared='keep': {model.config.model_type} has no shared expert")
    line = None
    calibrated = cfg.criterion not in ("random", "magnitude")
    if calibrated and ids is None:
        from shear.data.calibration import calibration_for

        ids, line = calibration_for(model, tokenizer, cfg.source, data, cfg.n_samples, cfg.seq_len, cfg.seed,
                                    key="expert_channels.source")
    before = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    stats = collect_channel_stats(model, ids if calibrated else None, cfg.batch_size)
    model.train(was_training)
    t1 = time.perf_counter()
    keep, shared_keep, layers = {}, {}, {}
    for b in blocks:
        st = stats[b.layer]
        sc, fb = channel_scores(st.routed, b.experts.down_proj.data, b.experts.gate_up_proj.data, cfg.criterion,
                                cfg.routing_weight, seed=cfg.seed * 100_003 + 2 * b.layer)
        keep[b.layer] = kept_channels(sc, n_remove)
        layers[str(b.layer)] = {"tokens": [int(c) for c in st.routed.count], "fallback": fb}
        if st.shared is not None and cfg.shared == "prune":
            mlp = shared_expert_of(b.block)[0]
            gu = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])[None]
            ssc, _ = channel_scores(st.shared, mlp.down_proj.weight.data[None], gu, cfg.criterion,
                                    cfg.routing_weight, seed=cfg.seed * 100_003 + 2 * b.layer + 1)
            shared_keep[b.layer] = kept_channels(ssc, channels_to_remove(ssc.shape[-1], cfg.ratio))[0]
        if fb:
            log.warning("layer %d: experts %s got fewer than the %s criterion's calibration tokens; their channels are "
                        "scored by weight magnitude", b.layer, fb, cfg.criterion)
    shared = None
    if has_shared:
        s_before = shared_expert_of(blocks[0].block)[0].down_proj.in_features
        shared = {"mode": cfg.shared, "channels_before": s_before,
                  "channels_after": next(iter(shared_keep.values())).numel() if shared_keep else s_before}
    slice_expert_channels_(model, keep, shared_keep)
    after = sum(p.numel() for p in model.parameters())
    log.info("expert channels: %d -> %d per expert by %s", width, width - n_remove, cfg.criterion)
    return {"mode": "expert_channels", "criterion": cfg.criterion, "routing_weight": cfg.routing_weight,
            "ratio": cfg.ratio, "config_key": EXPERT_WIDTH[model.config.model_type], "channels_before": width,
            "channels_after": width - n_remove, "num_experts": blocks[0].num_experts, "shared_expert": shared,
            "fallback": "magnitude", "fallback_experts": sum(len(v["fallback"]) for v in layers.values()),
            "calibration_text": line, "params_before": before, "params_after": after,
            "removed_ratio": 1 - after / before, "layers": layers,
            "time_s": {"score": t1 - t0, "total": time.perf_counter() - t0}}
