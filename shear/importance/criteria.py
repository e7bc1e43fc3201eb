"""Importance criteria as pure tensor functions (no hooks, no models).

Notation: a Member indexes ``num_units`` units of width ``w`` along ``dim`` of a parameter ``W``.
``per_unit(t, member)`` sums any elementwise tensor ``t`` (shaped like ``W``) over each unit's
slice, giving ``[num_units]``. Criteria (FIELD-NOTES section 3):

- magnitude L1:   sum_{w in u} |w|                      L2: sqrt(sum_{w in u} w^2)
- Taylor vector:  |sum_{w in u} w * g|                  (LLM-Pruner, "vector")
- Taylor element1: sum_{w in u} |w * g|                 (LLM-Pruner, "element1")
- element2:       sum_{w in u} |w * g - 1/2 w^2 F|,     F = diag Fisher = mean_s g_s^2
- Wanda-sp:       per input column j of a Linear: ||X_j||_2 * mean_i |W_ij|   (Sun et al. 2023, structured)
- FLAP:           per input column j: Var(X_j) * ||W[:, j]||_2^2              (An et al. 2024, eq. 5)
- Minitron:       per channel: L2 over samples of mean over tokens of |X_j|   (Muralidharan et al. 2024)
- block influence: 1 - E[cos(x_in, x_out)]             (ShortGPT, Men et al. 2024, eq. 2)
- angular distance: E[arccos(cos(x_in, x_out))] / pi   (Gromov et al. 2024, n = 1)
Higher score = more important in every criterion.
"""
from __future__ import annotations

import math

import torch

AGGREGATIONS = ("sum", "mean", "max", "prod", "first")


def per_unit(t: torch.Tensor, dim: int, units: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (any shape) over each unit's slice along ``dim``: ``[num_units]``, fp32.

    ``units`` is ``[num_units, width]``; width 0 means the whole tensor is one unit (layer kinds).
    """
    t = t.float()
    if units.shape[1] == 0:
        return t.sum().reshape(1).expand(units.shape[0]).clone()
    sel = t.index_select(dim, units.reshape(-1).to(t.device))  # [.., U*w, ..]
    sel = sel.movedim(dim, 0).reshape(units.shape[0], -1)
    return sel.sum(1).cpu()


def aggregate(member_scores: list[torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Combine per-member ``[num_units]`` scores into one ``[num_units]`` (sum/mean/max/prod/first)."""
    if not member_scores:
        raise ValueError("aggregate: no member scores")
    s = torch.stack([m.float() for m in member_scores])  # [M, U]
    if how == "sum":
        return s.sum(0)
    if how == "mean":
        return s.mean(0)
    if how == "max":
        return s.max(0).values
    if how == "prod":
        return s.prod(0)
    if how == "first":
        return s[0]
    raise ValueError(f"aggregation: unknown {how!r}; expected one of {AGGREGATIONS}")


def magnitude(w: torch.Tensor, dim: int, units: torch.Tensor, p: int = 1) -> torch.Tensor:
    """L1 (``p=1``) or L2 (``p=2``) norm of each unit's weights: ``[num_units]``."""
    if p == 1:
        return per_unit(w.abs(), dim, units)
    return per_unit(w.float() ** 2, dim, units).sqrt()


def taylor_vector(wg_sum: torch.Tensor) -> torch.Tensor:
    """``|sum_{w in u} w g|`` from the accumulated signed per-unit sums ``[num_units]``."""
    return wg_sum.abs()


def taylor_element1(w: torch.Tensor, g: torch.Tensor, dim: int, units: torch.Tensor) -> torch.Tensor:
    """``sum_{w in u} |w g|``; ``g`` the mean gradient over calibration samples."""
    return per_unit((w.float() * g.float()).abs(), dim, units)


def taylor_element2(w: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor, dim: int,
                    units: torch.Tensor) -> torch.Tensor:
    """``sum_{w in u} |w g - 1/2 w^2 F|``, ``F`` = mean of per-sample squared gradients (fp32)."""
    w = w.float()
    return per_unit((w * g.float() - 0.5 * w * w * fisher.float()).abs(), dim, units)


def wanda_columns(w: torch.Tensor, x_sqnorm: torch.Tensor) -> torch.Tensor:
    """Wanda-sp per input column of a Linear ``w [out, in]``: ``||X_j||_2 * mean_i |W_ij|`` -> ``[in]``.

    ``x_sqnorm[j] = sum over calibration tokens of X_j^2`` (the statistics live on the CPU; the result is on
    ``w``'s device, e.g. the GPU the model is scored on).
    """
    return x_sqnorm.float().sqrt().to(w.device) * w.float().abs().mean(0)


def flap_columns(w: torch.Tensor, x_sum: torch.Tensor, x_sqsum: torch.Tensor, n: int) -> torch.Tensor:
    """FLAP fluctuation per input column: ``Var(X_j) * ||W[:, j]||_2^2`` -> ``[in]`` (unbiased var), on ``w``'s
    device (the statistics are CPU fp64)."""
    mean = x_sum.double() / n
    var = (x_sqsum.double() - n * mean * mean) / max(n - 1, 1)
    return var.clamp_min(0).float().to(w.device) * (w.float() ** 2).sum(0)


def minitron_channels(sample_mean_abs_sq: torch.Tensor) -> torch.Tensor:
    """Minitron channel score: ``sqrt(sum_b (mean_s |X_bsj|)^2)`` from the accumulated squares -> ``[d]``."""
    return sample_mean_abs_sq.float().sqrt()


def columns_to_units(col: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Sum a per-column score ``[in]`` over each unit's columns ``[num_units, width]`` -> ``[num_units]``."""
    return col.float().cpu()[units.reshape(-1)].reshape(units.shape).sum(1)


def standardize(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """FLAP's standardization across layers: subtract the mean and divide by the std of all units."""
    flat = torch.cat([s.float() for s in scores])
    mu = flat.mean()
    sd = flat.std().clamp_min(1e-12) if flat.numel() > 1 else torch.tensor(1.0)
    return [(s.float() - mu) / sd for s in scores]


def cosine_tokens(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of ``[..., d]`` hidden states -> ``[...]`` (fp32)."""
    return torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)


def block_influence(cos_sum: float, n: int) -> float:
    """ShortGPT block influence ``1 - mean cos`` from a sum of per-token cosines over ``n`` tokens."""
    return 1.0 - cos_sum / max(n, 1)


def angular_distance(angle_sum: float, n: int) -> float:
    """Gromov et al. angular distance ``mean arccos(cos) / pi`` from a sum of per-token angles."""
    return angle_sum / max(n, 1) / math.pi
