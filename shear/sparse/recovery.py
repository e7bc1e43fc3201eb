"""Sparse recovery: training that keeps pruned weights at exactly zero (used by ``shear.train.trainer``).

Full fine-tuning: each masked weight's gradient is multiplied by its mask (a tensor hook) and the mask
is re-applied after every optimizer step, so neither the gradient, AdamW's moments nor weight decay
can move a zero (the re-application makes it exact whatever the optimizer does).

LoRA: the base weights are frozen, but the merged update ``(alpha / r) B A`` is dense. After the merge
the pruned positions are set to zero again (**re-masking after merge**); what that costs is measured
on the validation set in the same run (``val_ppl_merged`` vs ``val_ppl_remasked`` in the train metrics).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def zero_masks(model: nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": bool mask}`` (True = kept, i.e. non-zero) of the named modules' weights, in the
    parameter's own layout (Conv1D included)."""
    out = {}
    for name in modules:
        w = model.get_submodule(name).weight
        out[f"{name}.weight"] = (w.detach() != 0).cpu()
    return out


class MaskKeeper:
    """Keeps ``masks`` (parameter name -> bool, True = kept) on the parameters of ``model`` during training.

    ``model`` is the plain HF model (before any peft wrapping); the parameter objects are held, so the
    keeper follows them through peft, DDP and device moves.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [k for k in masks if k not in params]
        if missing:
            raise ValueError(f"train: sparse masks name parameters the model does not have: {', '.join(missing[:3])}")
        bad = [k for k in masks if tuple(masks[k].shape) != tuple(params[k].shape)]
        if bad:
            raise ValueError(f"train: sparse mask shapes differ from the parameters: {', '.join(bad[:3])}")
        self.names = list(masks)
        self.params = [params[k] for k in self.names]
        self._masks = [masks[k].bool() for k in self.names]
        self._hooks = [p.register_hook(self._grad_hook(j)) for j, p in enumerate(self.params) if p.requires_grad]

    def _mask(self, j: int, device) -> torch.Tensor:
        if self._masks[j].device != device:
            self._masks[j] = self._masks[j].to(device)
        return self._masks[j]

    def _grad_hook(self, j: int):
        return lambda g: g * self._mask(j, g.device)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights of the parameters being trained (after an optimizer step)."""
        for j, p in enumerate(self.params):
            if p.requires_grad:
                p.mul_(self._mask(j, p.device))

    def count_moved(self, model: nn.Module) -> int:
        """Pruned positions of ``model`` (by parameter name) that are not zero."""
        params = dict(model.named_parameters())
        return sum(int(((params[k].detach() != 0) & ~self._mask(j, params[k].device)).sum())
                   for j, k in enumerate(self.names))

    @torch.no_grad()
    def finalize(self, model: nn.Module, evaluate: Callable[[nn.Module], float] | None = None) -> dict:
        """Re-mask the trained plain model (after a LoRA merge) and report: masked weights, how many pruned
        positions had become non-zero and, when some had and ``evaluate`` is given, validation PPL
        before and after re-masking. Removes the gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        moved = self.count_moved(model)
        report = {"masked_weights": sum(int((~m).sum()) for m in self._masks), "nonzero_before_remask": moved}
        if moved and evaluate is not None:
            report["val_ppl_merged"] = evaluate(model)
        params = dict(model.named_parameters())
        for j, k in enumerate(self.names):
            params[k].mul_(self._mask(j, params[k].device))
        if moved and evaluate is not None:
            report["val_ppl_remasked"] = evaluate(model)
        return report
