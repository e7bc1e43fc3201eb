"""Remove whole experts of mixture-of-experts models, the same number in every sparse layer, so the result is
the stock class with a smaller ``num_local_experts`` / ``num_experts``.

    report = prune_experts_(model, tokenizer, ExpertPruneConfig(ratio=0.25, criterion="reconstruction"))

Scoring is :mod:`shear.importance.experts`; here: which experts stay, and the slicing (router rows and the
experts' fused ``[E, ., .]`` tensors), with the config updated by the same code. The sliced
model equals the unsliced one with the removed experts' router logits at -inf: the stock softmax then
renormalises over the experts that remain and top-k picks among them (``norm_topk_prob`` applies as before).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shear.importance.experts import MOE_FAMILIES, collect_expert_stats, expert_scores, find_moe_blocks

log = logging.getLogger("shear")


class ExpertCalibration(BaseModel):
    """The calibration text that scores experts or their channels (the fields both MoE configs share)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="calibration text (as importance.source; None: resolved as "
                                                 "for every calibrated command, shear/data/calibration.py)")
    n_samples: int | None = Field(None, gt=0, description="calibration sequences (None: the resolver's default)")
    seq_len: int | None = Field(None, gt=1, description="tokens per calibration sequence (None: the default)")
    seed: int = Field(0, description="seed of the calibration sampler and of the random criterion")
    batch_size: int = Field(8, gt=0, description="calibration sequences per forward pass")


class ExpertPruneConfig(ExpertCalibration):
    """How many experts go, by which criterion, and the calibration that scores them."""

    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of each sparse layer's experts removed "
                                                     "(floor(ratio * E) experts; the same in every layer)")
    criterion: Literal["frequency", "weighted", "reconstruction", "random"] = Field(
        "reconstruction", description="expert importance (shear.importance.experts); random is a seeded control")


def experts_to_remove(num_experts: int, ratio: float, top_k: int) -> int:
    """``floor(ratio * E)``; refused when it removes nothing or leaves fewer experts than ``top_k``."""
    n = math.floor(ratio * num_experts + 1e-9)
    if n == 0:
        raise ValueError(f"experts ratio {ratio} removes no expert of {num_experts}")
    if num_experts - n < top_k:
        raise ValueError(f"experts ratio {ratio} leaves {num_experts - n} of {num_experts} experts, fewer than "
                         f"num_experts_per_tok={top_k}")
    return n


def kept_experts(scores: torch.Tensor, n_remove: int) -> list[int]:
    """Indices of the ``E - n_remove`` highest ``scores [E]``, ascending (ties: the lower index stays)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:scores.numel() - n_remove])


def _take(p: torch.Tensor, idx: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.data.index_select(0, idx.to(p.device)).clone(), requires_grad=p.requires_grad)


def remove_experts_(model: nn.Module, keep: dict[int, list[int]]) -> nn.Module:
    """Keep only the experts ``keep[layer]`` (the same count in every sparse layer) in place: the router's rows,
    the experts, every ``num_experts`` attribute counting them and the config's expert count."""
    blocks = find_moe_blocks(model)
    missing = sorted({b.layer for b in blocks} - set(keep))
    if missing or set(keep) - {b.layer for b in blocks}:
        raise ValueError(f"keep names layers {sorted(keep)}; the sparse layers are {[b.layer for b in blocks]}")
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1:
        raise ValueError(f"kept expert counts differ across layers ({sorted(sizes)}); the stock class needs one")
    new = sizes.pop()
    old = {b.num_experts for b in blocks}
    for b in blocks:
        ids = sorted(set(keep[b.layer]))
        if len(ids) != new or ids[0] < 0 or ids[-1] >= b.num_experts:
            raise ValueError(f"layer {b.layer}: kept experts {keep[b.layer]} are not distinct indices below "
                             f"{b.num_experts}")
        if new < b.top_k:
            raise ValueError(f"layer {b.layer}: {new} experts left, fewer than top_k={b.top_k}")
        idx = torch.tensor(ids, dtype=torch.long)
        b.router.weight = _take(b.router.weight, idx)
        for name, p in list(b.experts.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == b.num_experts:  # gate_up_proj, down_proj (and biases)
                setattr(b.experts, name, _take(p, idx))
        for m in (b.block, b.router, b.experts):
            if getattr(m, "num_experts", None) == b.num_experts:
                m.num_experts = new
    key = MOE_FAMILIES[model.config.model_type][0]
    setattr(model.config, key, new)
    for m in model.modules():  # e.g. MixtralForCausalLM.num_experts (load-balancing loss)
        if isinstance(getattr(m, "num_experts", None), int) and m.num_experts in old:
            m.num_experts = new
    return model


def prune_experts_(model: nn.Module, tokenizer, cfg: ExpertPruneConfig, ids: torch.Tensor | None = None,
                   data=None) -> dict:
    """Score every sparse layer's experts, remove ``floor(cfg.ratio * E)`` per layer in place; the report.

    ``ids [n, L]`` overrides the calibration sampler (``shear.data.calibration.calibration_for``: the
    command's source, else ``data``, else the text shear trained the model on, else English).
    Report: ``layers[str(layer)] = {kept, removed, scores, routed_share}``: indices into the E experts before
    removal, every expert's score and its share of the calibration tokens' top-k slots.
    """
    t0 = time.perf_counter()
    blocks = find_moe_blocks(model)
    n_exp, top_k = blocks[0].num_experts, max(b.top_k for b in blocks)
    if any(b.num_experts != n_exp for b in blocks):
        raise ValueError("sparse layers hold different expert counts; expected one")
    n_remove = experts_to_remove(n_exp, cfg.ratio, top_k)
    line = None
    if cfg.criterion != "random" and ids is None:
        from shear.data.calibration import calibration_for

        ids, line = calibration_for(model, tokenizer, cfg.source, data, cfg.n_samples, cfg.seq_len, cfg.seed,
                                    key="experts.source")
    before = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    stats = collect_expert_stats(model, ids if cfg.criterion != "random" else None, cfg.batch_size)
    model.train(was_training)
    t1 = time.perf_counter()
    scores = expert_scores(stats, cfg.criterion, cfg.seed)
    keep = {layer: kept_experts(s, n_remove) for layer, s in scores.items()}
    remove_experts_(model, keep)
    after = sum(p.numel() for p in model.parameters())
    layers = {str(layer): {"kept": keep[layer], "removed": sorted(set(range(n_exp)) - set(keep[layer])),
                           "scores": [float(x) for x in scores[layer]],
                           "routed_share": [float(x) for x in stats[layer].count / max(stats[layer].tokens * top_k, 1)]}
              for layer in sorted(keep)}
    log.info("experts: %d -> %d per sparse layer by %s", n_exp, n_exp - n_remove, cfg.criterion)
    return {"mode": "experts", "criterion": cfg.criterion, "ratio": cfg.ratio, "experts_before": n_exp,
            "experts_after": n_exp - n_remove, "num_experts_per_tok": top_k,
            "calibration_text": line, "params_before": before, "params_after": after,
            "removed_ratio": 1 - after / before, "layers": layers,
            "time_s": {"score": t1 - t0, "total": time.perf_counter() - t0}}
