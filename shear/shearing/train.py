"""A small mask-learning loop: task loss (CE, or KD against the unpruned teacher) + the Lagrangian.

The same :class:`~shear.shearing.term.ShearingTerm` the trainer uses (λ₁, λ₂ ascend through negated
gradients), without accelerate, checkpoints or recipes: for notebooks and tests. Recipes use
``prune.learn`` (``shear.shearing.learn.learn_masks``), which trains in the full trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from shear.shearing.masks import ShearMasks
from shear.shearing.term import ShearingTerm
from shear.train.losses import plain_logit_losses


@dataclass
class ShearTrainConfig:
    """Mask-learning settings.

    Attributes:
        steps: optimizer steps.
        warmup: steps over which the target fraction ramps linearly from 1 to the target.
        mask_lr: learning rate of log α.
        lambda_lr: learning rate of λ₁, λ₂ (gradient ascent).
        weight_lr: learning rate of the model weights; 0 freezes them.
        kd_weight: weight of the KD term when a teacher is given; the CE term gets 1 − kd_weight.
        kd_loss: divergence (``shear.train.losses.token_divergence`` kinds).
        temperature: KD temperature.
        constraint: ``"per_row"`` (every layer's expected size against the per-layer target, LLM-Shearing)
            or ``"per_type"`` (one expected total per mask type).
        eval_keep: units the eval masks keep per row: ``"expected"`` (round of the expected count) or
            ``"target"``.
    """

    steps: int = 300
    warmup: int = 60
    mask_lr: float = 0.1
    lambda_lr: float = 0.1
    weight_lr: float = 0.0
    kd_weight: float = 1.0
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
    constraint: str = "per_row"
    eval_keep: str = "expected"


def _task_loss(model, teacher, ids: torch.Tensor, cfg: ShearTrainConfig) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].flatten()
    t_logits = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[:, :-1].flatten(0, 1)
    ce, kd = plain_logit_losses(logits, t_logits, targets, cfg.kd_loss, cfg.temperature)
    n = targets.numel()
    if teacher is None:
        return ce / n
    return ((1.0 - cfg.kd_weight) * ce + cfg.kd_weight * kd) / n


def train_masks(model: nn.Module, masks: ShearMasks, target: dict[str, int], batches: Iterable[torch.Tensor],
                cfg: ShearTrainConfig, teacher: nn.Module | None = None) -> list[dict]:
    """Learn ``masks`` toward ``target`` (``resolve_target``) on ``batches`` of token ids ``[B, T]``
    (cycled until ``cfg.steps``). Returns one log row per step: loss, lagrangian, ŝ and t per type.
    log α is clamped to ``masks.log_alpha_range`` after every optimizer step."""
    term = ShearingTerm(masks, target, cfg.warmup, mask_lr=cfg.mask_lr, lambda_lr=cfg.lambda_lr,
                        constraint=cfg.constraint, eval_keep=cfg.eval_keep)
    groups = term.param_groups()
    if cfg.weight_lr > 0:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.weight_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.train()
    masks.train()
    log, batches, step = [], list(batches), 0
    while step < cfg.steps:
        for ids in batches:
            if step >= cfg.steps:
                break
            term.step = step
            task = _task_loss(model, teacher, ids, cfg)
            lag_loss = term()
            opt.zero_grad(set_to_none=True)
            (task + lag_loss).backward()
            opt.step()
            masks.constrain_()  # log α back into its range after every step (the next draw would do it too)
            log.append({"step": step, "loss": float(task.detach()), "lagrangian": float(lag_loss.detach()),
                        **term.report})
            step += 1
    model.eval()
    masks.eval()
    return log
