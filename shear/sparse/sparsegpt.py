"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1): pure tensor functions.

For one layer ``W [out, in]`` with inputs ``X [tokens, in]`` the layer-wise problem is
``min ||W X^T - W_hat X^T||^2`` over ``W_hat`` with the mask's zeros. With ``H = 2 X^T X`` the
optimal brain surgeon (OBS) update after removing ``w_q`` is ``delta = -(w_q / [H^-1]_qq) H^-1_{:,q}``
(Eq. 3). SparseGPT processes columns left to right, each time using the upper Cholesky factor of the
inverse Hessian of the columns not yet processed (all rows share it), in blocks of ``blocksize``
columns whose updates to later columns are applied lazily, once per block. The mask of each block is
chosen when the block starts, from ``w^2 / [chol(H^-1)]_jj^2`` (Sec. 3.3 "adaptive mask selection");
N:M masks are chosen every M columns from the already-updated weights (Sec. 3.4).

This follows the authors' code (github.com/IST-DASLab/sparsegpt, ``fasterprune``) except that the
unstructured mask removes exactly ``int(sparsity * block size)`` weights per block (the reference's
``<= threshold`` can remove a few more on ties).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hessian:
    """Running ``H = (2 / n) sum_b X_b^T X_b`` in fp32 over ``n`` calibration sequences (the reference's
    ``add_batch``: a mean over sequences, so its scale does not grow with the calibration set)."""

    H: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, d: int, device=None) -> "Hessian":
        return cls(torch.zeros(d, d, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor, n_seqs: int) -> None:
        """``x [..., in]``: every token of ``n_seqs`` sequences (one batch)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        self.H.mul_(self.n / (self.n + n_seqs))
        self.n += n_seqs
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


def inverse_hessian_factor(H: torch.Tensor | list, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H' + dampening * mean(diag H') * I)^-1``, ``H'`` = ``H [in, in]`` with
    dead inputs (``H_jj = 0``) set to ``H_jj = 1``; ``H`` is not modified. Works on one fp32 copy, each step
    replacing the last, so at most two ``[in, in]`` matrices live at once beside ``H``. ``H`` in a one-element
    list: taken from it and used (fp32) as the first working copy, so two in all (it is overwritten).
    Raises ``torch.linalg.LinAlgError`` when not positive definite."""
    owned = isinstance(H, list)
    H = H.pop() if owned else H
    F = H.detach() if owned and H.dtype == torch.float32 else H.detach().to(torch.float32, copy=True)
    del H
    d = torch.arange(F.shape[0], device=F.device)
    F[d, d] = torch.where(F[d, d] == 0, 1.0, F[d, d])
    F[d, d] += dampening * torch.mean(torch.diag(F))
    F = torch.linalg.cholesky(F)
    F = torch.cholesky_inverse(F)
    return torch.linalg.cholesky(F, upper=True)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, rows: int = 256) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)`` with ``dW = W - W_hat`` (= ``||W X^T - W_hat X^T||^2 / ||W X^T||^2``);
    ``w, w_hat [out, in]`` (any dtype, views allowed), ``H [in, in]``. ``rows`` rows at a time, so the
    temporaries are ``[rows, in]`` rather than copies of ``W``."""
    Hf = H.detach().float()
    base = err = 0.0
    for r in range(0, w.shape[0], rows):
        w0 = w[r:r + rows].detach().float()
        dw = w0 - w_hat[r:r + rows].float()
        base += float(((w0 @ Hf) * w0).sum())
        err += float(((dw @ Hf) * dw).sum())
    return err / base if base > 0 else 0.0


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor | list, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, blocksize: int = 128,
                    dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``w [out, in]`` with the OBS update; ``H [in, in]`` from :class:`Hessian` (not modified).

    ``H`` may come in a one-element list the call takes it from (the caller keeping no other reference): then
    it is written to an anonymous temporary file while its inverse factor and the update run and read back for
    the relative error, so two ``[in, in]`` fp32 matrices are alive at a time instead of three (0.8 GB less
    for a 14,336-wide input). The results are the same bit for bit; after a ``LinAlgError`` the list holds
    ``H`` again, unchanged, for a retry.

    ``sparsity``: fraction removed in every block of columns (unstructured); ``pattern``: ``(N, M)``,
    keep N of every M consecutive columns per row (``blocksize`` must be a multiple of M).
    ``dampening``: fraction of ``mean(diag H)`` added to the diagonal. Inputs that never fire
    (``H_jj = 0``) have their weights zeroed, as in the reference.

    Returns ``(w_hat [out, in] fp32, keep mask [out, in] bool, relative error)`` with the relative
    reconstruction error ``tr(dW H dW^T) / tr(W H W^T)`` = ``||W X^T - W_hat X^T||^2 / ||W X^T||^2``.
    """
    if (sparsity is None) == (pattern is None):
        raise ValueError("sparsegpt: give exactly one of sparsity and pattern")
    if pattern is not None and blocksize % pattern[1]:
        raise ValueError(f"sparsegpt: blocksize {blocksize} is not a multiple of M={pattern[1]}")
    cols = w.shape[1]
    if pattern is not None and cols % pattern[1]:
        raise ValueError(f"N:M pattern {pattern[0]}:{pattern[1]}: {cols} input columns are not a multiple of {pattern[1]}")
    W = w.detach().to(torch.float32, copy=True).contiguous()  # Conv1D passes a transposed view
    box = H if isinstance(H, list) else None
    H = box.pop() if box is not None else H
    W[:, torch.diag(H) == 0] = 0.0
    if box is None:
        Hinv = inverse_hessian_factor(H, dampening)
    else:  # H goes to a file; the factor is computed in its memory (no other reference to it may stay)
        spilled, H = _spill(H), [H]
        try:
            Hinv = inverse_hessian_factor(H, dampening)
        except torch.linalg.LinAlgError:
            box.append(_unspill(spilled))
            raise
        H = None
    pruned = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        diag1 = torch.diag(Hinv1).reshape(1, -1)
        if pattern is None:  # Sec. 3.3: the block's mask from the OBS saliency w^2 / [H^-1]_jj^2
            score = W1 ** 2 / diag1 ** 2
            k = int(score.numel() * sparsity)
            mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
            if k:
                mask1.view(-1)[torch.argsort(score.flatten(), stable=True)[:k]] = True
        else:
            n, m = pattern
            mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
        for i in range(i2 - i1):
            if pattern is not None and i % m == 0:  # Sec. 3.4: N:M chosen on the updated weights
                score = W1[:, i:i + m] ** 2 / diag1[:, i:i + m] ** 2
                mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False)[1], True)
            col = W1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Q1[:, i], Err1[:, i] = q, err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of the later columns
    W[pruned] = 0.0
    del Hinv
    if H is None:
        H = _unspill(spilled)
    return W, ~pruned, relative_error(w, W, H)


def _spill(H: torch.Tensor):
    """``H`` (on the CPU) written to an anonymous temporary file; ``(file, shape, dtype, device)``."""
    import tempfile

    f = tempfile.TemporaryFile()
    f.write(memoryview(H.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
    return f, tuple(H.shape), H.dtype, H.device


def _unspill(spilled) -> torch.Tensor:
    """The tensor :func:`_spill` wrote, read back onto its device, and the file closed."""
    from shear.checkpoint import read_into

    f, shape, dtype, device = spilled
    out = torch.empty(shape, dtype=dtype)
    f.seek(0)
    read_into(f, out, out.numel() * out.element_size(), "sparsegpt: the spilled Hessian")
    f.close()
    return out.to(device)
