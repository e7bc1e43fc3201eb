"""LoRAPrune's criterion (Zhang et al. 2023, "LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning"): importance of the frozen weights from the LoRA factors and their
gradients, so scoring happens during LoRA tuning without any full-weight gradient.

With W' = W + s B A (B: [out, r], A: [r, in], s = alpha / r) and G = dL/dW':
    dL/dB = s G A^T,  dL/dA = s B^T G,
so  (dL/dB A + B dL/dA) / s = G A^T A + B B^T G  is the estimate of G used here (exact when A has
orthonormal rows spanning the input space and B = 0). Element importance is the first-order Taylor
term |W' * G_hat| (power 1) or its square (power 2); groups sum it over their rows/columns.
Only the score is implemented here; the iterative prune-tune schedule is not.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def estimated_weight_grad(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """[r, in], [out, r], their grads, s -> [out, in] estimate of dL/dW' (see module docstring)."""
    return (grad_B.float() @ A.float() + B.float() @ grad_A.float()) / scaling


def taylor_importance(W_eff: torch.Tensor, grad_est: torch.Tensor, power: int = 1) -> torch.Tensor:
    """Element importance |W' * G_hat| ** power, [out, in]."""
    return (W_eff.float() * grad_est).abs().pow(power)


@torch.no_grad()
def lora_importance(model: nn.Module, adapter: str = "default", power: int = 1) -> dict[str, torch.Tensor]:
    """{module path (without the peft prefix): [out, in] importance} for every LoRA-wrapped Linear
    whose factors have gradients (call after backward). Reads no gradient of the frozen weights."""
    out = {}
    for name, mod in model.named_modules():
        lora_A, lora_B = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter not in lora_A:
            continue
        A, B = lora_A[adapter].weight, lora_B[adapter].weight
        if A.grad is None or B.grad is None:
            continue
        s = float(mod.scaling[adapter])
        W_eff = mod.base_layer.weight.float() + s * (B.float() @ A.float())
        key = name.removeprefix("base_model.model.")
        out[key] = taylor_importance(W_eff, estimated_weight_grad(A, B, A.grad, B.grad, s), power)
    return out


def update_ema(avg: dict[str, torch.Tensor] | None, cur: dict[str, torch.Tensor], beta: float = 0.9):
    """Moving average of scores over tuning steps: beta * avg + (1 - beta) * cur."""
    if avg is None:
        return {k: v.clone() for k, v in cur.items()}
    return {k: beta * avg[k] + (1 - beta) * v for k, v in cur.items()}
