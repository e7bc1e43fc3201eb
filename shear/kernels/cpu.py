"""CPU paths of SparseLinear and the measured rule that picks one per call.

Candidates (all pure torch; ``tools/bench_sparse_kernel.py --device cpu --quick`` times them side by
side, interleaved, on the shapes and sparsities of the table in docs/BENCHMARKS.md):

- ``dense``: ``F.linear`` on the decoded weight (MKL/oneDNN GEMM; reads 4 bytes per weight in fp32).
- ``csr``: torch's sparse CSR with int32 indices, ``W_csr @ X.T`` (MKL sparse; reads 8 bytes per
  non-zero: 2.4 bytes per weight at 70%, 0.8 at 90%, but every value gathers its X element).
- ``bsr``: torch's block CSR (16 x 16 blocks). An unstructured mask at 50-90% leaves practically no
  block empty (P(empty) = s^256), so BSR stores the dense matrix plus indices: never chosen.
- ``reference``: ``format.reference_linear`` (decodes the bitmap on every call): the ground truth,
  never chosen (hundreds of times slower than dense).

The rule (``cpu_path``), from the crossovers measured there (4 shapes x 4 sparsities x 6 token counts,
weights rotated past the L3 cache, fp32, 1 thread): CSR when the sparsity reaches

    N = 1, <= 4M weights   70%   CSR streams ~10 GB/s against GEMV's ~16 GB/s and moves 0.6x the bytes: 0.88-0.96x
    N = 1, larger          75%   4096x4096: CSR streams only ~5 GB/s; 1.03-1.10x at 70%, 0.61-0.89x at 80%
    N = 2..64              70%   dense GEMM is inefficient on skinny inputs (half GEMV's GB/s at N = 8)
    N = 65..256            80%   dense GEMM gets efficient: at N = 256, 70% loses (1.1-1.9x), 80% is 0.6-1.07x
    N > 256                90%   not measured; CSR only where it skips 90% of the work

else dense.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from shear.kernels.format import BitmapTiles, decode, reference_linear

CPU_PATHS = ("dense", "csr", "bsr", "reference")

#: min sparsity for CSR at one token, by weight count (<= SMALL_WEIGHTS or above); then by max tokens N
CSR_ONE_TOKEN = (0.7, 0.75)
SMALL_WEIGHTS = 2**22
CSR_THRESHOLDS = ((64, 0.7), (256, 0.8), (None, 0.9))
_EPS = 1e-3  # a "70%" mask keeps int(0.7 n) zeros: 0.6999998 must count as 70%


def cpu_path(n_tokens: int, sparsity: float, numel: int) -> str:
    """``"csr"`` or ``"dense"`` for ``n_tokens`` rows through a weight of ``numel`` entries at this sparsity
    (the measured rule of the module docstring)."""
    if n_tokens <= 1:
        return "csr" if sparsity >= CSR_ONE_TOKEN[numel > SMALL_WEIGHTS] - _EPS else "dense"
    for max_n, min_s in CSR_THRESHOLDS:
        if max_n is None or n_tokens <= max_n:
            return "csr" if sparsity >= min_s - _EPS else "dense"
    return "dense"


def build(fmt: BitmapTiles, path: str):
    """The representation a CPU path multiplies with (built once, cached by SparseLinear): a dense or CSR
    tensor, ``(padded BSR tensor, out_features)``, or the format itself (reference)."""
    if path == "dense":
        return decode(fmt).contiguous()
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        if path == "csr":
            c = decode(fmt).to_sparse_csr()
            return torch.sparse_csr_tensor(c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32),
                                           c.values(), size=c.shape)
        if path == "bsr":  # BSR needs whole blocks: pad to multiples of 16, slice the output in apply
            w = decode(fmt)
            pad = (0, -w.shape[1] % 16, 0, -w.shape[0] % 16)
            return F.pad(w, pad).to_sparse_bsr((16, 16)), w.shape[0]
    if path == "reference":
        return fmt
    raise ValueError(f"cpu path {path!r}: expected one of {CPU_PATHS}")


def apply(path: str, rep, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d [N, in] @ W.T + bias`` -> ``[N, out]`` through ``rep = build(fmt, path)``."""
    if path == "dense":
        return F.linear(x2d, rep, bias)
    if path == "reference":
        return reference_linear(x2d, rep, bias)
    if path == "bsr":
        bsr, rows = rep
        y = (bsr @ F.pad(x2d, (0, bsr.shape[1] - x2d.shape[1])).t())[:rows].t()
    else:
        y = (rep @ x2d.t()).t()                 # csr: sparse [out, in] @ dense [in, N]
    return y + bias if bias is not None else y
