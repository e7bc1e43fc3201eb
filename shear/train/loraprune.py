"""LoRAPrune's criterion (Zhang et al. 2023, "LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning"): importance of the frozen weights from the LoRA factors and their
gradients, so scoring happens during LoRA tuning without any full-weight gradient.

With W' = W + s B A (B: [out, r], A: [r, in], s = alpha / r), one SGD step on the factors moves
B A by -eta (G_B A + B G_A - eta G_B G_A) (G_B = dL/dB, G_A = dL/dA). The paper's LoRA-guided
criterion takes the bracket, with the inner eta dropped, as the gradient of the merged weight:

    G_hat = G_B A + B G_A - G_B G_A                       [out, in]

exactly as the reference code computes it (aim-uofa/LoRAPrune, ``compute_sensitivity``): raw
factor gradients, which carry s (G_B = s G A^T, G_A = s B^T G for G = dL/dW'), not divided by it.
With B = 0 (fresh adapters) G_A = 0 and G_hat = s G A^T A. Element importance is the first-order
Taylor term |W' * G_hat| (power 2 squares it). The reference then sums it per unit (head or
channel) of each module, divides that vector by its L2 norm, adds the modules of a block, and keeps
a moving average 0.9 * avg + 0.1 * cur over steps that starts at 0 and skips a step whose scores are
not finite; ``shear.train.iterative.group_scores_from_elements`` and :func:`update_ema` do those.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def estimated_weight_grad(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor) -> torch.Tensor:
    """A [r, in], B [out, r] and their grads -> G_B A + B G_A - G_B G_A, [out, in] (module docstring)."""
    A, B, gA, gB = A.float(), B.float(), grad_A.float(), grad_B.float()
    return gB @ A + B @ gA - gB @ gA


def taylor_importance(W_eff: torch.Tensor, grad_est: torch.Tensor, power: int = 1) -> torch.Tensor:
    """Element importance |W' * G_hat| ** power, [out, in]."""
    return (W_eff.float() * grad_est).abs().pow(power)


@torch.no_grad()
def lora_importance(model: nn.Module, adapter: str = "default", power: int = 1) -> dict[str, torch.Tensor]:
    """{module path (without the peft prefix): importance |W' * G_hat| ** power} for every LoRA-wrapped
    layer whose factors have gradients (call after backward), in the layout of its weight parameter:
    [out, in] for a Linear, [in, out] for GPT-2's Conv1D (peft's fan_in_fan_out). Reads no gradient
    of the frozen weights."""
    out = {}
    for name, mod in model.named_modules():
        lora_A, lora_B = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter not in lora_A:
            continue
        A, B = lora_A[adapter].weight, lora_B[adapter].weight
        if A.grad is None or B.grad is None:
            continue
        s, t = float(mod.scaling[adapter]), bool(getattr(mod, "fan_in_fan_out", False))
        W = mod.base_layer.weight.float()
        W_eff = (W.T if t else W) + s * (B.float() @ A.float())
        imp = taylor_importance(W_eff, estimated_weight_grad(A, B, A.grad, B.grad), power)
        out[name.removeprefix("base_model.model.")] = imp.T if t else imp
    return out


def update_ema(avg: dict[str, torch.Tensor] | None, cur: dict[str, torch.Tensor], beta: float = 0.9):
    """Moving average of scores over tuning steps, as the reference keeps it: beta * avg + (1 - beta)
    * cur from avg = 0 (None), and avg unchanged when any score of ``cur`` is NaN/inf (a step whose
    gradients overflowed does not enter the average)."""
    if not all(torch.isfinite(v).all() for v in cur.values()):
        return avg
    if avg is None:
        return {k: (1 - beta) * v for k, v in cur.items()}
    return {k: beta * avg[k] + (1 - beta) * v for k, v in cur.items()}
