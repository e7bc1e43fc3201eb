"""Unstructured and N:M masks from weights and activations: pure tensor functions, no modules.

Convention: ``W`` is ``[out, in]`` (GPT-2's Conv1D is transposed by the caller), a mask is a bool
tensor of the same shape with True = weight KEPT. N:M groups are M consecutive input columns of one
row (the layout 2:4 sparse tensor cores and compressed-tensors' 2:4 format use).

Scores (higher = keep):
- magnitude: ``|W_ij|``, compared across the whole matrix (Han et al. 2015; the layer-wise baseline of
  Wanda and SparseGPT).
- Wanda: ``|W_ij| * ||X_j||_2`` with ``X [tokens, in]`` the layer input, compared within each output
  row (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", Eq. 1 and Sec. 3).
"""
from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive weights (0 < N < M)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ValueError(f"pattern {pattern!r}: expected N:M, e.g. 2:4")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, mm


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W|`` in fp32, ``[out, in]``."""
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``: ``w [out, in]``, ``x_norm [in]`` (L2 norm of each input channel over
    all calibration tokens) -> ``[out, in]`` fp32 (Wanda, Eq. 1)."""
    if x_norm.shape != (w.shape[1],):
        raise ValueError(f"wanda: x_norm has shape {tuple(x_norm.shape)}, expected ({w.shape[1]},)")
    return w.detach().float().abs() * x_norm.to(w.device, torch.float32).reshape(1, -1)


def keep_smallest_out(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Mask that removes exactly the ``k`` lowest scores along ``dim`` (per row for ``dim=1``), or
    over the whole tensor for ``dim=None``. Ties are broken by position (stable sort)."""
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if dim is None:
        idx = torch.argsort(scores.flatten(), stable=True)[:k]
        mask.view(-1)[idx] = False
        return mask
    idx = torch.argsort(scores, dim=dim, stable=True).narrow(dim, 0, k)
    return mask.scatter_(dim, idx, False)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Remove ``int(sparsity * n)`` weights with the lowest scores, ``n`` = row length (``per_row``,
    Wanda) or the number of weights (magnitude). ``scores [out, in]`` -> bool mask (True = keep)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity}: expected 0 <= sparsity < 1")
    if per_row:
        return keep_smallest_out(scores, int(scores.shape[1] * sparsity), dim=1)
    return keep_smallest_out(scores, int(scores.numel() * sparsity), dim=None)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of each row.

    ``scores [out, in]`` with ``in % m == 0`` -> bool mask with exactly ``n`` True per group.
    """
    out, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m}: {cols} input columns are not a multiple of {m}")
    groups = scores.reshape(out, cols // m, m)  # a copy when scores is a transposed (Conv1D) view
    return keep_smallest_out(groups, m - n, dim=2).reshape(out, cols)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive columns keeps exactly ``n`` (``mask [out, in]``)."""
    out, cols = mask.shape
    return cols % m == 0 and bool((mask.reshape(out, cols // m, m).sum(-1) == n).all())


def mask_for(method: str, w: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None,
             x_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The magnitude or Wanda mask of ``w [out, in]`` at ``sparsity`` or N:M ``pattern``."""
    if method == "magnitude":
        scores = magnitude_scores(w)
    elif method == "wanda":
        if x_norm is None:
            raise ValueError("wanda: needs the input norms ||X_j|| of the layer")
        scores = wanda_scores(w, x_norm)
    else:
        raise ValueError(f"mask_for: unknown method {method!r} (sparsegpt masks come from shear.sparse.sparsegpt)")
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return unstructured_mask(scores, sparsity, per_row=method == "wanda")
