"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL):
A Missing Secret Sauce for Pruning LLMs to High Sparsity", Sec. 4): pure functions.

Layer l's outlier ratio ``D_l`` is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` (all pruned
linears of the block together) above ``M * mean`` of those scores. Layers with more outliers are pruned
less: as in the authors' code, the ratios are min-max normalised and spread over a range of ``2 lambda``
centred on the target, ``S_l = S - 2 lambda (d_l - mean(d))`` with ``d = (D - min D) / (max D - min D)``,
so the mean sparsity over layers is the target. The paper bounds every layer to ``[S - lambda,
S + lambda]``; where the spread above exceeds that (skewed ratios), the deviations are scaled down to
``lambda`` (the mean stays the target). Defaults M = 5, lambda = 0.08 (the paper's LLaMA settings).
"""
from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (a block's Wanda score matrices) above ``m`` times their mean."""
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsities around ``target`` from per-layer outlier ratios; mean = ``target``, every
    value within ``target +- lam``. Equal ratios give the uniform plan."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    if len(ratios) < 2 or span == 0 or lam == 0:
        return [float(target)] * len(ratios)
    d = (r - r.min()) / span
    dev = -2.0 * lam * (d - d.mean())
    worst = float(dev.abs().max())
    if worst > lam:
        dev = dev * (lam / worst)
    s = target + dev
    if float(s.min()) < 0.0 or float(s.max()) >= 1.0:
        raise ValueError(f"sparsify.owl_lambda: {lam} puts a layer's sparsity outside [0, 1) around the target "
                         f"{target} (got {float(s.min()):.3f} .. {float(s.max()):.3f}); use a smaller lambda")
    return [float(x) for x in s]
