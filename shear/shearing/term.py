"""The mask-learning term the trainer adds to its loss: hard-concrete masks plus the Lagrangian.

    term = ShearingTerm(attach_masks(model, graph, types), target, warmup=25, mask_lr=0.1, lambda_lr=0.1)
    train(model, ..., shearing=term)

The term is a submodule of the trainer's loss module, so DDP reduces its gradients and checkpoints
save and resume it with the weights. λ₁, λ₂ are maximised: a hook negates their gradient, so one
minimising optimizer (their own parameter group, no weight decay) does gradient ascent on them.
log α is clamped to ``masks.log_alpha_range`` before every mask draw (``ShearMasks.draw``, run by the
model's forward pre-hook), so no forward after an optimizer step sees an unclamped value.
"""
from __future__ import annotations

import torch
from torch import nn

from shear.shearing.masks import ShearMasks
from shear.shearing.target import Lagrangian, full_shape


class ShearingTerm(nn.Module):
    """``forward()`` -> (Lagrangian loss, {type: (expected kept fraction ŝ, ramped target t)}) at ``self.step``.

    ``constraint``: ``"per_row"`` (each layer's expected size against the per-layer target, LLM-Shearing)
    or ``"per_type"`` (one expected total per type). ``eval_keep``: units the eval masks keep per row,
    ``"expected"`` (round of the row's expected kept units) or ``"target"`` (the target: the masked
    eval model is then the finished model); types without a target keep every unit in eval.
    """

    def __init__(self, masks: ShearMasks, target: dict[str, int], warmup: int, mask_lr: float = 0.1,
                 lambda_lr: float = 0.1, constraint: str = "per_row", eval_keep: str = "expected"):
        super().__init__()
        missing = set(target) - set(masks.masks)
        if missing:
            raise ValueError(f"shearing.target: no masks attached for {sorted(missing)}")
        if constraint not in ("per_row", "per_type"):
            raise ValueError(f"shearing.constraint: {constraint!r} is not 'per_row' or 'per_type'")
        if eval_keep not in ("expected", "target"):
            raise ValueError(f"shearing.eval_keep: {eval_keep!r} is not 'expected' or 'target'")
        self.masks = masks
        full = full_shape(masks.graph)
        for t, m in masks.masks.items():
            m.keep = full[t] if t not in target else (target[t] if eval_keep == "target" else None)
        rows = {t: m.log_alpha.shape[0] for t, m in masks.masks.items()}
        self.lagrangian = Lagrangian(full, target, rows, warmup, per_row=constraint == "per_row").to(
            next(masks.parameters()).device)
        for p in self.lagrangian.parameters():
            p.register_hook(torch.neg)  # gradient ascent on λ through a minimising optimizer
        self.target, self.mask_lr, self.lambda_lr = dict(target), mask_lr, lambda_lr
        self.report: dict = {}  # the last forward's {type: (ŝ, t)}
        self.step = 0  # set by the trainer before each optimizer step (the target ramp reads it)

    def forward(self) -> torch.Tensor:
        loss, self.report = self.lagrangian(self.masks.expected_rows(), self.step)
        return loss

    def param_groups(self) -> list[dict]:
        """Optimizer groups: log α at ``mask_lr``, λ at ``lambda_lr``; no weight decay, constant lr
        (``constant_lr`` tells the trainer's schedule to leave them alone)."""
        return [{"params": list(self.masks.parameters()), "lr": self.mask_lr, "weight_decay": 0.0, "constant_lr": True},
                {"params": list(self.lagrangian.parameters()), "lr": self.lambda_lr, "weight_decay": 0.0,
                 "constant_lr": True}]
