"""Equal budgets for the comparison: non-zero parameters and bytes on disk (pure functions on modules).

- Non-zero parameters: every stored parameter that is not exactly zero (tied tensors once).
- Unstructured pruning zeros weights of the block linears only (``shear.sparse``: never embeddings,
  norms or the LM head), so the share of THOSE weights to zero is solved from the whole model's
  count: ``s = 1 - (budget - nonzero_outside) / numel_linears``.
- Bytes of the compressed-tensors bitmask form: its bitmask and row offsets depend on the shapes only,
  so each further non-zero weight costs exactly its element size. From one measured export at a known
  count, the count that fills a given number of bytes follows (up to the few bytes of the safetensors
  header whose offsets change length).
"""
from __future__ import annotations

import torch
from torch import nn


def nonzero_params(model: nn.Module) -> int:
    """Parameters of ``model`` that are not exactly zero (``parameters()`` yields a tied tensor once)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def linear_weights(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The weights of the named modules (``[out, in]``, or ``[in, out]`` for GPT-2's Conv1D)."""
    return [model.get_submodule(n).weight for n in names]


def sparsity_for_nonzero(model: nn.Module, names: list[str], budget: int) -> float:
    """The share of the named linears' weights to zero so that ``model`` keeps ``budget`` non-zero parameters.

    Zeros already in those weights count toward the share (the sparsifiers remove the lowest scores,
    and a zero scores lowest). Raises ``ValueError`` when the budget cannot be met by those weights alone.
    """
    ws = linear_weights(model, names)
    numel = sum(w.numel() for w in ws)
    outside = nonzero_params(model) - sum(int(torch.count_nonzero(w.detach())) for w in ws)
    keep = budget - outside
    if keep <= 0:
        raise ValueError(f"a budget of {budget:,} non-zero parameters is below the {outside:,} that unstructured "
                         "pruning never touches (embeddings, norms, LM head): no sparsity of the block linears meets it")
    s = 1.0 - keep / numel
    if s <= 0:
        raise ValueError(f"a budget of {budget:,} non-zero parameters needs no pruning of the block linears")
    return s


@torch.no_grad()
def trim_to_nonzero_(model: nn.Module, names: list[str], budget: int) -> int:
    """Zero the smallest-magnitude non-zero weights of the named linears until ``model`` has ``budget``
    non-zero parameters; return how many were zeroed (0 when it has no more than that).

    The sparsifiers round the count they remove down in every block of columns, so a model can keep a
    few more weights than the budget (at most one per block); this removes exactly that remainder.
    """
    excess = nonzero_params(model) - budget
    if excess <= 0:
        return 0
    ws = linear_weights(model, names)
    mags = torch.cat([w.detach().abs().flatten().float() for w in ws])
    mags[mags == 0] = float("inf")
    if excess > int(torch.isfinite(mags).sum()):
        raise ValueError(f"trim: {excess} weights over the budget, more than the linears hold")
    drop = torch.topk(mags, excess, largest=False).indices
    start = 0
    for w in ws:
        local = drop[(drop >= start) & (drop < start + w.numel())] - start
        w.view(-1)[local] = 0  # parameters are contiguous: view(-1) writes into them
        start += w.numel()
    return excess


def nonzero_for_bytes(measured_bytes: int, measured_nonzero: int, target_bytes: int, element_size: int) -> int:
    """Non-zero count whose bitmask-compressed weights take ``target_bytes``, from one export that took
    ``measured_bytes`` at ``measured_nonzero`` (each non-zero costs ``element_size`` bytes; rounded down)."""
    return measured_nonzero + (target_bytes - measured_bytes) // element_size
