"""``SparseLinear`` and ``to_sparse_linear_(model, SparseLinearConfig(...))``: masked linears -> the bitmap format.

    from shear.kernels import SparseLinearConfig, to_sparse_linear_
    swapped = to_sparse_linear_(model)          # every linear in the blocks with >= 25% zeros
    model.generate(...)                         # runs on SparseLinear

``SparseLinear`` has ``nn.Linear``'s forward contract: ``x [..., in] -> [..., out]`` (+ bias), any
leading dims, the output in ``x``'s dtype. It is for inference: the weight is a set of buffers
(``bitmap``, ``values``, ``tile_offsets``; shear.kernels.format), not a parameter, and the Triton path
has no backward. ``model.half()`` / ``.to(torch.bfloat16)`` convert the values (the bitmap and the
offsets keep their integer types). Save exports (dense or compressed-tensors, ``shear sparsify``)
rather than a swapped model: its state dict is the format, which ``from_pretrained`` cannot load.

Paths, per call (``path="auto"``):
- CUDA: the fused Triton kernel (shear.kernels.triton_kernel) up to ``CUDA_KERNEL_MAX_TOKENS`` rows;
  above that (prefill of a long prompt, compute-bound) the weight is decoded and cuBLAS multiplies.
  Without triton: decode + cuBLAS, with one warning.
- CPU: CSR or dense by the measured rule of shear.kernels.cpu. The representation a path uses is
  built on first use and kept: a module that sees both decode (CSR) and prefill (dense) calls holds
  both besides the format (CPU memory traded for speed; ``path="csr"`` keeps only CSR).
"""
from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from shear.kernels import cpu
from shear.kernels.format import TILE_K, TILE_M, BitmapTiles, decode, encode

log = logging.getLogger("shear")

#: above this many rows on CUDA the weight is decoded and multiplied by cuBLAS (not yet tuned on a GPU)
CUDA_KERNEL_MAX_TOKENS = 256
PATHS = ("auto", "triton", "dense", "csr", "bsr", "reference")


def triton_linear():
    """The Triton launcher (imported on first CUDA use; tests substitute an interpreted copy)."""
    from shear.kernels.triton_kernel import bitmap_linear

    return bitmap_linear


class SparseLinear(nn.Module):
    """A linear whose ``[out, in]`` weight is stored as bitmap + packed values (see the module docstring)."""

    def __init__(self, fmt: BitmapTiles, bias: torch.Tensor | None = None, path: str = "auto"):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"SparseLinear: path {path!r}: expected one of {PATHS}")
        self.out_features, self.in_features = fmt.shape
        self.tile = tuple(fmt.tile)
        self.path = path
        self.register_buffer("bitmap", fmt.bitmap)
        self.register_buffer("values", fmt.values)
        self.register_buffer("tile_offsets", fmt.tile_offsets)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cache: dict = {}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   tile: tuple[int, int] = (TILE_M, TILE_K), path: str = "auto") -> "SparseLinear":
        """From a masked dense ``weight [out, in]`` (kept = ``mask``, or ``weight != 0``)."""
        return cls(encode(weight.detach(), mask, tile), bias, path)

    @property
    def fmt(self) -> BitmapTiles:
        return BitmapTiles((self.out_features, self.in_features), self.tile, self.bitmap, self.values,
                           self.tile_offsets)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity:.3f}, tile={self.tile}, path={self.path}")

    def choose_path(self, n_tokens: int, device: torch.device) -> str:
        """The path a call with ``n_tokens`` rows on ``device`` takes."""
        if self.path != "auto":
            return self.path
        if device.type == "cuda":
            return "triton" if n_tokens <= CUDA_KERNEL_MAX_TOKENS and _has_triton() else "decode"
        return cpu.cpu_path(n_tokens, self.sparsity, self.out_features * self.in_features)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}  # device / dtype moves: rebuild the CPU representations on next use
        return super()._apply(fn, *args, **kwargs)

    def _rep(self, path: str):
        """The cached representation of ``path`` (rebuilt when the values moved or changed dtype)."""
        key = (path, self.values.device, self.values.dtype, self.values.data_ptr())
        if self._cache.get(path, (None,))[0] != key:
            self._cache[path] = (key, cpu.build(self.fmt, path))
        return self._cache[path][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"SparseLinear: input is {x.dtype} but the weight is {self.values.dtype} "
                            "(convert the model, e.g. model.to(dtype))")
        x2d = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        path = self.choose_path(x2d.shape[0], x.device)
        if path == "triton":
            y = triton_linear()(x2d, self.fmt, bias)
        elif path == "decode":
            y = nn.functional.linear(x2d, decode(self.fmt), bias)
        else:
            y = cpu.apply(path, self._rep(path), x2d, bias)
        return y.reshape(*x.shape[:-1], self.out_features)


_TRITON_OK: bool | None = None


def _has_triton() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
            warnings.warn("SparseLinear: triton is not installed (pip install 'shear[kernels]'); on CUDA each call "
                          "decodes the weight and runs cuBLAS", stacklevel=3)
    return _TRITON_OK


class SparseLinearConfig(BaseModel):
    """Which linears become SparseLinear and how they run."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | None = Field(None, description="module names (suffix match) or 're:' regexes of linears inside the "
                                                        "blocks; None = every linear in the blocks with at least "
                                                        "min_sparsity zeros (embeddings and the LM head are never swapped)")
    min_sparsity: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of zero weights a linear needs; a named "
                                                                  "target below it is an error, an unnamed one stays dense")
    tile: tuple[int, int] = Field((TILE_M, TILE_K), description="format tile (output rows, input columns): powers of two >= 16")
    path: str = Field("auto", description="auto (CUDA: Triton kernel; CPU: the measured CSR/dense rule), or force one of "
                                          "triton, dense, csr, bsr, reference")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v not in PATHS:
            raise ValueError(f"unknown path {v!r}; expected one of {PATHS}")
        return v


def _weight_out_in(mod: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    return mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight


@torch.no_grad()
def to_sparse_linear_(model: nn.Module, cfg: SparseLinearConfig | None = None) -> list[str]:
    """Replace the masked linears of ``model``'s blocks (``nn.Linear`` and GPT-2's ``Conv1D``) by SparseLinear
    in place; return their names. Refuses (``ValueError``) when nothing qualifies or a named target is
    below ``min_sparsity``."""
    from shear.sparse.sequential import select_linears

    cfg = cfg or SparseLinearConfig()
    names = [n for ns in select_linears(model, cfg.targets).values() for n in ns]
    swapped, dense, too_dense = [], [], []
    for name in names:
        mod = model.get_submodule(name)
        w = _weight_out_in(mod)
        sparsity = float((w == 0).sum()) / w.numel()
        if sparsity < cfg.min_sparsity:
            (too_dense if cfg.targets is not None else dense).append(f"{name} ({sparsity:.1%})")
            continue
        new = SparseLinear.from_dense(w, mod.bias, tile=cfg.tile, path=cfg.path)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped.append(name)
    if too_dense:
        raise ValueError(f"sparse linear: targets below min_sparsity {cfg.min_sparsity}: {', '.join(too_dense[:5])}")
    if not swapped:
        raise ValueError(f"sparse linear: no linear in the blocks has at least {cfg.min_sparsity:.0%} zeros "
                         "(sparsify the model first: shear sparsify)")
    if dense:
        log.warning("sparse linear: %d linears kept dense (below min_sparsity %.2f): %s", len(dense),
                    cfg.min_sparsity, ", ".join(dense[:5]) + (" ..." if len(dense) > 5 else ""))
    log.info("sparse linear: %d linears swapped to SparseLinear", len(swapped))
    return swapped
