"""The fused Triton kernel ``Y = X @ W.T (+ bias)`` reading W in the bitmap format (shear.kernels.format).

"Load as sparse, compute as dense" (Flash-LLM, Xia et al. 2023, section 4): each program owns one
block of ``TILE_M`` output features and ``BLOCK_N`` tokens and walks its share of the K tiles. Per
tile it loads the 256-byte bitmap and the tile's packed values, expands them into a dense
``[TILE_M, TILE_K]`` register tile (value index = tile offset + exclusive prefix sums of the bits,
first over a row, then over the rows' counts) and multiplies on tensor cores with ``tl.dot``,
accumulating in fp32. Only ``2d + 1/8`` bytes per weight leave HBM (fp16/bf16).

Decoding (N <= 64 tokens) gives few output blocks (4096 outputs / 32 = 128 programs on a 132-SM
H100), too few to keep HBM busy, so K is split (``split_k``) until there are about four programs per
SM. Split partials are added into an fp32 workspace with atomics; the last program of a block (an
atomic counter says which) reads the sum atomically, zeroes the workspace for the next call, adds
the bias, casts and stores: one launch, no memset, no extra epilogue kernel.
The workspace and counters are kept per device and are always left at zero, so concurrent calls on
two streams of one device must not share them (not supported). With split-K the order of the fp32
atomic adds varies, so results can differ from run to run at fp32 rounding level (about 1 ulp of
the fp16/bf16 output); without split (``split_k=1``) the kernel is deterministic.

Shapes: ``x2d [N, K]`` (any N: a third grid axis walks blocks of ``BLOCK_N`` tokens), ``W [M, K]``,
``y [N, M]``. Inputs fp16 / bf16 (fp32 works too: ``tl.dot`` in IEEE fp32, for the interpreter tests).
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs on CPU tensors.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shear.kernels.format import BitmapTiles


@triton.jit
def _epilogue(acc, bias_ptr, y_ptr, rn, rm, N, M, stride_yn, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)[None, :]
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    tl.store(y_ptr + rn[:, None] * stride_yn + rm[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bitmap_linear_kernel(x_ptr, bitmap_ptr, values_ptr, offsets_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
                         N, M, K, stride_xn, stride_yn, tiles_m, tiles_k, tiles_per_split, n_splits,
                         TILE_M: tl.constexpr, TILE_K: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_n = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, TILE_M)
    rc = tl.arange(0, TILE_K)
    byte_idx = rr[:, None] * (TILE_K // 8) + (rc // 8)[None, :]    # [TILE_M, TILE_K] -> byte of the tile
    shift = (rc % 8)[None, :]
    acc = tl.zeros((BLOCK_N, TILE_M), dtype=tl.float32)
    k_first = pid_s * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, tiles_k)
    for kt in range(k_first, k_last):
        tile = pid_m * tiles_k + kt
        packed = tl.load(bitmap_ptr + tile.to(tl.int64) * (TILE_M * TILE_K // 8) + byte_idx)
        bits = (packed.to(tl.int32) >> shift) & 1
        row_cnt = tl.sum(bits, axis=1)
        idx = (tl.cumsum(row_cnt, axis=0) - row_cnt)[:, None] + tl.cumsum(bits, axis=1) - bits
        start = tl.load(offsets_ptr + tile)
        w = tl.load(values_ptr + start + idx, mask=bits != 0, other=0.0)   # [TILE_M, TILE_K], dense
        kk = kt * TILE_K + rc
        x = tl.load(x_ptr + rn[:, None] * stride_xn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                    other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    rm = pid_m * TILE_M + rr
    if SPLIT:
        mask = (rn[:, None] < N) & (rm[None, :] < M)
        ws = ws_ptr + rn[:, None] * M + rm[None, :]
        tl.atomic_add(ws, acc, mask=mask)
        counter = count_ptr + pid_n * tiles_m + pid_m
        if tl.atomic_add(counter, 1) == n_splits - 1:      # the last split of this block: finish it
            total = tl.atomic_add(ws, tl.zeros_like(acc), mask=mask)   # an atomic read of the sum
            total = tl.where(mask, total, 0.0)                          # masked lanes return garbage
            tl.store(ws, tl.zeros_like(acc), mask=mask)                 # leave the workspace at zero
            tl.atomic_xchg(counter, 0)
            _epilogue(total, bias_ptr, y_ptr, rn, rm, N, M, stride_yn, HAS_BIAS)
    else:
        _epilogue(acc, bias_ptr, y_ptr, rn, rm, N, M, stride_yn, HAS_BIAS)


_WORKSPACE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n_floats: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 workspace and int32 counters of at least these sizes (kept zero by the kernel)."""
    key = str(device)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n_floats or cnt.numel() < n_counters:
        ws = torch.zeros(max(n_floats, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(n_counters, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def block_n(n: int) -> int:
    """Tokens per program: 16 (tl.dot's minimum) up to 16 tokens, 32 up to 32, else 64."""
    return 16 if n <= 16 else 32 if n <= 32 else 64


def launch_config(n: int, fmt: BitmapTiles, sm_count: int, programs_per_sm: int = 4,
                  min_tiles_per_split: int = 4) -> dict:
    """``{"block_n", "split_k", "tiles_per_split"}`` for N tokens: split K until about
    ``programs_per_sm * sm_count`` programs, keeping at least ``min_tiles_per_split`` K tiles each."""
    tiles_m, tiles_k = fmt.grid
    bn = block_n(n)
    base = tiles_m * -(-n // bn)
    split = max(1, min(-(-programs_per_sm * sm_count // base), tiles_k // min_tiles_per_split))
    per = -(-tiles_k // split)
    return {"block_n": bn, "split_k": -(-tiles_k // per), "tiles_per_split": per}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any value; small so that tests exercise split-K


def bitmap_linear(x2d: torch.Tensor, fmt: BitmapTiles, bias: torch.Tensor | None = None,
                  split_k: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``x2d [N, K] @ W.T + bias`` -> ``[N, M]`` in ``x2d``'s dtype; ``fmt.values`` must have that dtype.

    ``split_k`` overrides the heuristic (``launch_config``): 1 = no split."""
    n, k = x2d.shape
    m = fmt.shape[0]
    if k != fmt.shape[1]:
        raise ValueError(f"bitmap_linear: x has {k} features, the weight expects {fmt.shape[1]}")
    if fmt.values.dtype != x2d.dtype:
        raise ValueError(f"bitmap_linear: x is {x2d.dtype}, the weight's values are {fmt.values.dtype}")
    x2d = x2d.contiguous()
    y = torch.empty((n, m), dtype=x2d.dtype, device=x2d.device)
    if n == 0:
        return y
    tiles_m, tiles_k = fmt.grid
    cfg = launch_config(n, fmt, _sm_count(x2d.device))
    if split_k is not None:
        per = -(-tiles_k // max(1, min(split_k, tiles_k)))
        cfg.update(split_k=-(-tiles_k // per), tiles_per_split=per)
    bn, split = cfg["block_n"], cfg["split_k"]
    n_blocks = -(-n // bn)
    ws, cnt = _workspace(x2d.device, n * m if split > 1 else 1, tiles_m * n_blocks if split > 1 else 1)
    precision = "ieee" if x2d.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs
    bitmap_linear_kernel[(tiles_m, split, n_blocks)](
        x2d, fmt.bitmap, fmt.values, fmt.tile_offsets, bias if bias is not None else y, y, ws, cnt,
        n, m, k, x2d.stride(0), y.stride(0), tiles_m, tiles_k, cfg["tiles_per_split"], split,
        TILE_M=fmt.tile[0], TILE_K=fmt.tile[1], BLOCK_N=bn, HAS_BIAS=bias is not None, SPLIT=split > 1,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return y
