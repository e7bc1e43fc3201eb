"""The storage format of a sparse weight: a bitmap and the packed non-zero values, tile by tile.

Why this format (bytes per weight of a bf16/fp16 matrix at density d = 1 - sparsity; decoding at
N <= 64 tokens is memory-bound, so time ~ bytes read; ../shared/FIELD-NOTES.md section 7):

    dense                               2
    CSR, int32 column indices           6d        (breaks even at d = 1/3)
    value + int16 in-tile position      4d        (Flash-LLM's Tiled-CSL; breaks even at d = 1/2)
    value + uint8 in-tile position      3d  + 4/tile (positions < 256 force tiles of <= 256 weights)
    bitmap + packed values (this)       2d + 1/8 + 4/tile

                     sparsity 50%    70%     80%     90%
    bitmap + values         1.125   0.725   0.525   0.325   bytes per weight (x dense: 0.56 0.36 0.26 0.16)
    value + uint8 pos       1.5     0.9     0.6     0.3
    value + int16 pos       2.0     1.2     0.8     0.4
    CSR int32               3.0     1.8     1.2     0.6

The bitmap beats every position-list format wherever d > 1/8 (sparsity < 87.5%) and is within 8% of
the best at 90% (0.325 vs 0.3), so one format covers 50-90%. It has a second property a kernel needs:
the bitmap of a tile sits at a fixed address (its size does not depend on the data), so a program
finds its tile's bits without reading anything first; only one int32 per tile (where its values
start) is data-dependent. The tile offsets cost 4 bytes per TILE_M x TILE_K = 2048 weights (0.002
bytes per weight at the default 32 x 64). For fp32 weights (CPU) every "2" above is a "4".

Layout (``W`` is ``[out, in]`` as in ``nn.Linear``; both sides padded with zeros to whole tiles):

- ``bitmap``: uint8 ``[tiles_m, tiles_k, TILE_M, TILE_K // 8]``; bit ``b`` (LSB first) of byte ``j`` in
  row ``r`` of tile ``(i, k)`` is ``W[i*TILE_M + r, k*TILE_K + 8*j + b] != 0``. One tile's bits are 256
  contiguous bytes at the default tile.
- ``values``: ``[nnz]`` in the weight's dtype, tile after tile (``i`` major, then ``k``), row-major inside a
  tile: a program that walks the K tiles of one row block reads one contiguous run of values.
- ``tile_offsets``: int32 ``[tiles_m * tiles_k + 1]``, where each tile's values start (the last is nnz).

Inside a tile the value of position ``(r, c)`` is ``values[offset + row_start[r] + popcount of row r's
bits before c]`` with ``row_start`` the exclusive prefix sum of the rows' popcounts: two prefix sums
over the unpacked bits, which is what the Triton kernel computes.

``encode`` makes the format from a masked dense weight (zeros = pruned, as ``shear sparsify`` leaves
them); ``decode`` and ``reference_linear`` are the exact pure-torch ground truth every test compares to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_M, TILE_K = 32, 64
_BIT = 1 << torch.arange(8, dtype=torch.int32)  # LSB first


@dataclass
class BitmapTiles:
    """A ``[out, in]`` weight as bitmap + packed values per ``tile`` (see the module docstring)."""

    shape: tuple[int, int]
    tile: tuple[int, int]
    bitmap: torch.Tensor        # uint8 [tiles_m, tiles_k, TILE_M, TILE_K // 8]
    values: torch.Tensor        # [nnz], weight dtype
    tile_offsets: torch.Tensor  # int32 [tiles_m * tiles_k + 1]

    @property
    def grid(self) -> tuple[int, int]:
        """``(tiles_m, tiles_k)``."""
        return self.bitmap.shape[0], self.bitmap.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight: bitmap + values + tile offsets."""
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.tile_offsets))

    def to(self, device=None, dtype=None) -> "BitmapTiles":
        """A copy on ``device`` with values in ``dtype`` (bitmap and offsets keep theirs)."""
        return BitmapTiles(self.shape, self.tile, self.bitmap.to(device), self.values.to(device, dtype),
                           self.tile_offsets.to(device))


def format_bytes(out_features: int, in_features: int, sparsity: float, value_bytes: int = 2,
                 tile: tuple[int, int] = (TILE_M, TILE_K)) -> int:
    """Bytes of the format for a matrix of that size and sparsity (the arithmetic of the docstring)."""
    tm, tk = tile
    mp, kp = -(-out_features // tm) * tm, -(-in_features // tk) * tk
    nnz = round(out_features * in_features * (1.0 - sparsity))
    return nnz * value_bytes + mp * kp // 8 + 4 * ((mp // tm) * (kp // tk) + 1)


def _check_tile(tile: tuple[int, int]) -> None:
    tm, tk = tile
    if tm < 16 or tk < 16 or tm & (tm - 1) or tk & (tk - 1):
        raise ValueError(f"tile {tile}: both sides must be powers of two >= 16 (tl.dot's smallest block)")


def _tiled(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """``[out, in]`` -> ``[tiles_m, tiles_k, TILE_M, TILE_K]`` (zero-padded)."""
    tm, tk = tile
    m, k = x.shape
    mp, kp = -(-m // tm) * tm, -(-k // tk) * tk
    x = torch.nn.functional.pad(x, (0, kp - k, 0, mp - m))
    return x.reshape(mp // tm, tm, kp // tk, tk).permute(0, 2, 1, 3)


@torch.no_grad()
def encode(weight: torch.Tensor, mask: torch.Tensor | None = None,
           tile: tuple[int, int] = (TILE_M, TILE_K)) -> BitmapTiles:
    """The format of ``weight`` ``[out, in]``; kept positions are ``mask`` (bool, same shape) or ``weight != 0``.

    Values keep ``weight``'s dtype and device. A kept position whose value is zero is stored (and
    decodes to zero)."""
    if weight.dim() != 2:
        raise ValueError(f"encode: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    _check_tile(tile)
    mask = weight != 0 if mask is None else mask.to(device=weight.device, dtype=torch.bool)
    if mask.shape != weight.shape:
        raise ValueError(f"encode: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    if int(mask.sum()) >= 2**31:
        raise ValueError("encode: more than 2^31 - 1 non-zeros; the int32 tile offsets cannot address them")
    mt = _tiled(mask, tile)                                           # [Tm, Tk, TM, TK] bool
    values = _tiled(weight, tile)[mt]                                 # tile-major, row-major in a tile
    bits = mt.reshape(*mt.shape[:3], tile[1] // 8, 8).to(torch.int32)
    bitmap = (bits * _BIT.to(weight.device)).sum(-1).to(torch.uint8)
    counts = mt.sum((2, 3)).flatten()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=weight.device)
    offsets[1:] = counts.cumsum(0)
    return BitmapTiles((weight.shape[0], weight.shape[1]), tuple(tile), bitmap, values.contiguous(),
                       offsets.to(torch.int32))


def _tile_bits(fmt: BitmapTiles) -> torch.Tensor:
    """The bitmap unpacked: bool ``[tiles_m, tiles_k, TILE_M, TILE_K]``."""
    bits = (fmt.bitmap.to(torch.int32).unsqueeze(-1) & _BIT.to(fmt.bitmap.device)) != 0  # [.., TK/8, 8]
    return bits.flatten(-2)


def _untiled(tiles: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    tm_n, tk_n, tm, tk = tiles.shape
    return tiles.permute(0, 2, 1, 3).reshape(tm_n * tm, tk_n * tk)[: shape[0], : shape[1]]


def unpack_mask(fmt: BitmapTiles) -> torch.Tensor:
    """The kept positions, bool ``[out, in]``."""
    return _untiled(_tile_bits(fmt), fmt.shape)


@torch.no_grad()
def decode(fmt: BitmapTiles) -> torch.Tensor:
    """The dense ``[out, in]`` weight, exactly (values in their own dtype, zeros elsewhere)."""
    tiles = _tile_bits(fmt)
    if int(tiles.sum()) != fmt.nnz:
        raise ValueError(f"decode: the bitmap has {int(tiles.sum())} bits set but there are {fmt.nnz} values")
    dense = torch.zeros(tiles.shape, dtype=fmt.values.dtype, device=fmt.values.device)
    dense[tiles] = fmt.values
    return _untiled(dense, fmt.shape)


def reference_linear(x: torch.Tensor, fmt: BitmapTiles, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` in fp32 from the decoded weight, cast to ``x.dtype``: the ground truth.

    ``x``: ``[..., in]`` -> ``[..., out]``."""
    y = x.float() @ decode(fmt).float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
