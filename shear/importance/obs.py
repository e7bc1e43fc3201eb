"""Structured Optimal Brain Surgeon on a consumer's input columns: scores and reconstruction (pure math).

A consumer is the projection that reads what a structure produces: o_proj for heads / KV groups,
down_proj (fc2) for MLP channels. With calibration inputs ``X [n, in]`` (tokens in rows) of the
consumer ``y = W x``, ``W [out, in]``, the layer-wise error of replacing ``W`` by ``W'`` is
``E(W') = ||X Wᵀ - X W'ᵀ||²_F = ½ tr((W - W') H (W - W')ᵀ)`` with ``H = 2 Xᵀ X`` (``[in, in]``, the
Hessian of E per output row; SparseGPT's convention, usually divided by n).

Removing a unit = a set ``S`` of input columns (a head's ``head_dim`` columns, one MLP channel) and
refitting the kept columns ``R`` optimally (OBS with the constraint ``W'_S = 0``; Hassibi & Stork
1993, in the structured form of ZipLM, Kurtic et al. 2023, eq. 2-3, and SlimGPT, Ling et al. 2024):

    ΔE_S = ½ tr(W_S ((H⁻¹)_SS)⁻¹ W_Sᵀ)                         the error increase (the score)
    W_R ← W_R - W_S ((H⁻¹)_SS)⁻¹ (H⁻¹)_{S,R},   W_S ← 0        the reconstruction

The update is the exact minimiser of E with ``W'_S = 0``, i.e. the least-squares refit of the kept
columns ``W'_R = W H_{:,R} (H_RR)⁻¹``; removing the set at once (what :func:`obs_update` does, one
solve per layer) or one unit at a time with inverse-Hessian updates gives the same weights for the
same set. (The ½ makes ``ΔE_S`` equal the brute-force increase of ``||XWᵀ - XW'ᵀ||²`` when
``H = 2XᵀX`` is not dampened.) Which units go is chosen by ZipLM's greedy loop (:func:`greedy_order`):
scoring each unit alone ignores that correlated units can stand in for each other.

Dampening (SparseGPT): ``H + λI`` with ``λ = damp · mean(diag H)`` (``damp = 0.01`` by default), so
``E`` gains ``λ/2 ||W - W'||²`` (a ridge toward the original weights); inputs that are always 0 get
``H_ii = 1``. A bias is refitted by giving the consumer a constant input 1 (an extra last column
of ``X`` and of ``W``) that is never removed: FLAP's mean compensation is then part of the refit.
"""
from __future__ import annotations

import torch

DAMP = 0.01  #: dampening as a fraction of the mean diagonal of H (SparseGPT's percdamp)


def add_to_hessian(h: torch.Tensor, n: int, x: torch.Tensor, with_bias: bool = False) -> int:
    """Fold a batch ``x [.., in]`` into the running mean ``h = (2/n) Σ x xᵀ`` (``[in(+1), in(+1)]``) in place.

    ``with_bias``: append a constant 1 to every input (the bias column). Returns the new token count.
    """
    x = x.reshape(-1, x.shape[-1]).to(h.dtype)
    if with_bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    m = x.shape[0]
    if m == 0:
        return n
    h.mul_(n / (n + m))
    h.addmm_(x.t(), x, alpha=2.0 / (n + m))
    return n + m


def inverse_hessian(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)`` and dead inputs (``H_ii = 0``) set to 1; ``[d, d]``.

    Computed through a Cholesky factorisation in ``h``'s dtype (fp32 in the estimator, fp64 in tests).
    """
    h = h.clone()
    d = torch.arange(h.shape[0], device=h.device)
    dead = h[d, d] == 0
    h[dead, dead] = 1.0
    h[d, d] += damp * h[d, d].mean()
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def unit_errors(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``ΔE_u = ½ tr(W_S ((H⁻¹)_SS)⁻¹ W_Sᵀ)`` for each unit ``u`` alone (``S = units[u]``); ``[U]``.

    ``w [out, in]``, ``hinv [in, in]`` (or bigger, with the bias column last), ``units [U, k]`` column indices.
    """
    u = units.to(w.device)
    if u.shape[1] == 1:  # one column per unit (MLP channels): ½ ||W_j||² / (H⁻¹)_jj, no batched solve
        j = u[:, 0]
        return 0.5 * (w[:, j] ** 2).sum(0) / hinv[j, j]
    hs = hinv[u.unsqueeze(2), u.unsqueeze(1)]  # [U, k, k]
    ws = w[:, u].permute(1, 2, 0)  # [U, k, out]
    sol = torch.linalg.solve(hs, ws)  # ((H⁻¹)_SS)⁻¹ W_Sᵀ per unit
    return 0.5 * (ws * sol).sum((1, 2))


def set_error(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``ΔE_S`` for removing all columns ``cols`` together (a scalar tensor)."""
    return unit_errors(w, hinv, cols.reshape(1, -1))[0]


def obs_update(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The reconstructed weight: ``W - W_S ((H⁻¹)_SS)⁻¹ (H⁻¹)_{S,:}`` with ``W_S`` exactly 0; ``[out, in]``.

    ``cols``: the removed input columns (any order). ``w`` is not modified.
    """
    c = cols.to(w.device)
    if c.numel() == 0:
        return w.clone()
    sol = torch.linalg.solve(hinv[c][:, c], hinv[c])  # ((H⁻¹)_SS)⁻¹ (H⁻¹)_{S,:}  [k, in]
    out = w - w[:, c] @ sol
    out[:, c] = 0.0
    return out


def refit(w: torch.Tensor, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The same reconstruction as a least-squares refit of the kept columns ``R``:
    ``W'_R = W H_{:,R} (H_RR)⁻¹``, ``W'_S = 0`` (``h`` already dampened; used to check :func:`obs_update`)."""
    keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    keep[cols.to(w.device)] = False
    out = torch.zeros_like(w)
    out[:, keep] = torch.linalg.solve(h[keep][:, keep], (w @ h[:, keep]).t()).t()
    return out


def greedy_order(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor,
                 n: int | None = None, step: int = 1) -> tuple[list[int], torch.Tensor]:
    """ZipLM's greedy removal (Kurtic et al. 2023, Alg. 1): repeatedly remove the unit of least ``ΔE``
    given the units already removed, updating ``W`` (:func:`obs_update`) and ``H⁻¹`` (the inverse of
    the kept block, ``H⁻¹ - H⁻¹_{:,S} ((H⁻¹)_SS)⁻¹ H⁻¹_{S,:}``) after each removal.

    ``step`` > 1 removes the ``step`` units of least ``ΔE`` at once per round (one joint update, as GEMMs:
    about ``step`` times fewer rounds for wide layers; ``step=1`` is the exact greedy loop).
    Returns (unit order, marginal ``ΔE`` of each removal ``[n]``; within a round, each unit's own ``ΔE`` at
    the round's start, their sum replaced by the round's joint ``ΔE``); ``n``: stop after this many units
    (None: all of them; the last round then removes everything but a bias column). With ``step=1`` the
    marginal errors sum to the joint ``ΔE`` of the removed set. Cost: ``n/step`` rounds over the remaining
    units plus ``n`` column updates of ``[in, in]``, i.e. ``O(in³)`` for MLP channels.
    """
    w, hinv = w.clone(), hinv.clone()
    left = torch.arange(units.shape[0])
    order, marg = [], []
    n = units.shape[0] if n is None else n
    while len(order) < n:
        err = unit_errors(w, hinv, units[left])
        b = min(step, n - len(order))
        if b == 1:
            pick = torch.argmin(err).reshape(1)
        else:
            pick = torch.topk(err, b, largest=False).indices
            pick = pick[torch.argsort(err[pick], stable=True)]
        chosen = left[pick.cpu()]
        c = units[chosen].reshape(-1).to(w.device)
        if b > 1:  # the round's joint error, spread over its units in proportion to their own errors
            joint = set_error(w, hinv, c)
            share = err[pick] / err[pick].sum().clamp_min(1e-30)
            marg += list((share * joint).unbind())
        else:
            marg.append(err[pick[0]])
        if c.numel() == 1:  # rank-1 forms of obs_update and of the inverse update
            j = int(c[0])
            row = hinv[j] / hinv[j, j]
            w.addr_(w[:, j].clone(), row, alpha=-1.0)
            w[:, j] = 0.0
            hinv.addr_(hinv[:, j].clone(), row, alpha=-1.0)
        else:
            w = obs_update(w, hinv, c)
            hinv = hinv - hinv[:, c] @ torch.linalg.solve(hinv[c][:, c], hinv[c])
        hinv[c, c] = 1.0  # removed columns: rows/cols now 0; a unit diagonal keeps later solves regular
        order += chosen.tolist()
        keep = torch.ones(left.numel(), dtype=torch.bool)
        keep[pick.cpu()] = False
        left = left[keep]
    return order, torch.stack(marg) if marg else torch.zeros(0)


def greedy_scores(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor, rounds: int = 128) -> torch.Tensor:
    """Scores ``[U]`` (fp32, higher = keep) that rank the units of one consumer in ZipLM's greedy order.

    The ``k``-th unit removed scores the largest marginal ``ΔE`` of the first ``k`` removals (so the
    scores rise along the order, made strictly increasing in fp32): a planner that drops the ``n``
    lowest drops the greedy first ``n``, and units of different layers compare by the error their
    removal adds at that point. Wide consumers go in about ``rounds`` rounds of ``ceil(U / rounds)`` units
    (``greedy_order``'s ``step``: 12 MLP channels per round at 1,536), heads one at a time.
    """
    order, marg = greedy_order(w, hinv, units, step=max(1, -(-units.shape[0] // rounds)))
    m = torch.cummax(marg.detach().float().cpu(), 0).values
    out = torch.empty(units.shape[0], dtype=torch.float32)
    prev = torch.tensor(-float("inf"))
    for k, u in enumerate(order):
        prev = torch.maximum(m[k], torch.nextafter(prev, torch.tensor(float("inf"))))
        out[u] = prev
    return out
