"""shear.kernels: the bitmap format against hand-computed bytes, the Triton kernel under TRITON_INTERPRET=1
against the pure-torch reference, SparseLinear's contract, the swap on every family, GPU checks.

Triton reads TRITON_INTERPRET when it is first imported (its own library functions are decorated
then), so interpreted and compiled kernels cannot share a process. ``test_kernel_under_interpreter``
therefore runs the ``test_interp_*`` tests of this file in a subprocess with TRITON_INTERPRET=1; in
the parent run they are skipped with that reason.
"""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from families import family_model, outputs
from shear.kernels import SparseLinear, SparseLinearConfig, decode, encode, reference_linear, to_sparse_linear_
from shear.kernels import cpu
from shear.kernels import sparse_linear as sl
from shear.kernels.format import format_bytes, unpack_mask

try:
    import triton  # noqa: F401  (this process never runs interpreted kernels, so importing it here is safe)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[kernels]')")
interpreted = pytest.mark.skipif(not (HAS_TRITON and INTERPRET),
                                 reason="triton is not installed (pip install -e '.[kernels]')" if not HAS_TRITON else
                                 "runs in the TRITON_INTERPRET=1 subprocess of test_kernel_under_interpreter")


def gpu(fn):
    """GPU tests: marked ``gpu``, skipped without a CUDA device or triton."""
    ok = torch.cuda.is_available() and HAS_TRITON and not INTERPRET
    return pytest.mark.gpu(pytest.mark.skipif(not ok, reason="needs a CUDA device and triton")(fn))


def masked(out, inp, sparsity, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < sparsity] = 0
    return w.to(dtype)


# ------------------------------------------------------------------------------------------- format

def test_format_bytes_by_hand():
    # 2 x 3 weight, tile 16 x 16: kept (0,0), (0,2), (1,1) -> row 0 byte 0b101, row 1 byte 0b010
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    f = encode(w, tile=(16, 16))
    assert f.bitmap.shape == (1, 1, 16, 2) and f.bitmap.dtype == torch.uint8
    assert f.bitmap[0, 0, 0, 0] == 0b101 and f.bitmap[0, 0, 1, 0] == 0b010
    assert int(f.bitmap.to(torch.int32).sum()) == 0b101 + 0b010
    assert f.values.tolist() == [1.0, 2.0, 3.0] and f.tile_offsets.tolist() == [0, 3]
    assert f.nbytes() == 16 * 2 + 3 * 4 + 2 * 4


def test_format_tile_order_and_offsets():
    # 32 x 32 with tile 16 x 16: tiles are stored (0,0), (0,1), (1,0), (1,1), row-major inside each
    w = torch.zeros(32, 32)
    w[0, 20], w[1, 3], w[0, 5], w[17, 1], w[31, 31] = 1.0, 2.0, 3.0, 4.0, 5.0
    f = encode(w, tile=(16, 16))
    assert f.values.tolist() == [3.0, 2.0, 1.0, 4.0, 5.0]
    assert f.tile_offsets.tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("shape", [(37, 70), (32, 64), (33, 65), (1, 1), (100, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_exact(shape, dtype):
    w = masked(*shape, 0.7, dtype)
    f = encode(w)
    assert torch.equal(decode(f), w) and torch.equal(unpack_mask(f), w != 0)
    assert f.values.dtype == dtype and f.nnz == int((w != 0).sum())


def test_roundtrip_all_zero_and_dense_and_explicit_mask():
    z = torch.zeros(40, 70)
    assert encode(z).nnz == 0 and torch.equal(decode(encode(z)), z)
    d = torch.randn(40, 70) + 10.0
    assert encode(d).nnz == d.numel() and torch.equal(decode(encode(d)), d)
    w = torch.randn(8, 20)
    keep = torch.rand(8, 20) < 0.5
    keep[0, 0] = True
    w[0, 0] = 0.0  # a kept position holding zero is stored and decodes to zero
    f = encode(w, mask=keep)
    assert f.nnz == int(keep.sum()) and torch.equal(unpack_mask(f), keep) and torch.equal(decode(f), w * keep)


def test_format_bytes_formula_matches():
    w = torch.ones(300, 200)
    w.view(-1)[torch.randperm(w.numel())[: int(0.7 * w.numel())]] = 0
    assert encode(w.half()).nbytes() == format_bytes(300, 200, 0.7, value_bytes=2)


def test_encode_refusals():
    with pytest.raises(ValueError, match="powers of two"):
        encode(torch.ones(4, 4), tile=(24, 64))
    with pytest.raises(ValueError, match="mask shape"):
        encode(torch.ones(4, 4), mask=torch.ones(4, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- the kernel, interpreted

@needs_triton
@pytest.mark.skipif(INTERPRET, reason="this is the interpreter run itself")
def test_kernel_under_interpreter():
    """The test_interp_* tests below, in a subprocess with TRITON_INTERPRET=1 (small shapes: ~15 s)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_",
                        str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 14 and " skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


@pytest.fixture(scope="module")
def interp():
    """The kernel module (interpreted: this runs only with TRITON_INTERPRET=1 set before triton's import)."""
    from shear.kernels import triton_kernel

    return triton_kernel


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _check(interp, w, n, dtype, bias=True, split_k=None, tile=(32, 64)):
    f = encode(w.to(dtype), tile=tile)
    x = torch.randn(n, w.shape[1]).to(dtype)
    b = torch.randn(w.shape[0]).to(dtype) if bias else None
    y = interp.bitmap_linear(x, f, b, split_k=split_k)
    ref = reference_linear(x, f, b)
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])
    return y, (x, f, b)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,n", [((37, 70), 1), ((33, 65), 17), ((64, 128), 16), ((50, 130), 70)])
def test_interp_kernel_odd_sizes_and_token_counts(interp, dtype, shape, n):
    _check(interp, masked(*shape, 0.7), n, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_kernel_all_zero_and_fully_dense_tiles(interp, dtype):
    w = masked(64, 192, 0.6)
    w[:32, :64] = 0.0                                   # an all-zero tile
    w[32:, 64:128] = torch.randn(32, 64) + 5.0          # a fully dense tile
    w[:32, 128:] = torch.randn(32, 64)                  # another dense one at the K edge
    f = encode(w)
    assert (f.tile_offsets[1] - f.tile_offsets[0]) == 0 and (f.tile_offsets[5] - f.tile_offsets[4]) == 32 * 64
    _check(interp, w, 3, dtype, split_k=1)
    _check(interp, w, 3, dtype, split_k=3)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_kernel_split_k_leaves_workspace_clean(interp, dtype):
    w = masked(70, 640, 0.8)                            # 10 K tiles, split in 4 / 3 / 2 programs
    y1, (x, f, b) = _check(interp, w, 5, dtype, split_k=4)
    y2 = interp.bitmap_linear(x, f, b, split_k=3)
    y3 = interp.bitmap_linear(x, f, b, split_k=4)
    torch.testing.assert_close(y2.float(), y1.float(), **TOL[dtype])
    assert torch.equal(y3, y1)                           # same split: bit-identical, workspace was left at zero
    ws, cnt = interp._WORKSPACE["cpu"]
    assert not ws.any() and not cnt.any()


@interpreted
def test_interp_kernel_no_bias_other_tile_and_heuristic_split(interp):
    _check(interp, masked(48, 96, 0.9), 2, torch.float32, bias=False, tile=(16, 32))
    f = encode(masked(40, 1024, 0.5))
    cfg = interp.launch_config(1, f, sm_count=8)
    assert cfg["split_k"] > 1 and cfg["block_n"] == 16 and cfg["tiles_per_split"] * cfg["split_k"] >= 16


@interpreted
def test_interp_kernel_refuses_mismatches(interp):
    f = encode(masked(8, 32, 0.5))
    with pytest.raises(ValueError, match="features"):
        interp.bitmap_linear(torch.randn(2, 31), f)
    with pytest.raises(ValueError, match="values are"):
        interp.bitmap_linear(torch.randn(2, 32).half(), f)


@interpreted
def test_interp_swap_through_interpreted_kernel_keeps_logits(interp, monkeypatch):
    """The whole model on the kernel path (interpreted): logits within fp32 atol 1e-4 of the dense model."""
    from shear.sparse import SparsifyConfig, sparsify_

    model = family_model("llama")
    sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.7))
    ids = torch.randint(0, 128, (1, 5))
    ref = outputs(model, ids)
    monkeypatch.setattr(sl, "triton_linear", lambda: interp.bitmap_linear)
    to_sparse_linear_(model, SparseLinearConfig(path="triton"))
    torch.testing.assert_close(outputs(model, ids), ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------- SparseLinear

@pytest.mark.parametrize("path", ["auto", "dense", "csr", "bsr", "reference"])
def test_sparse_linear_matches_nn_linear(path):
    lin = torch.nn.Linear(70, 37)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.7)
    sp = SparseLinear.from_dense(lin.weight, lin.bias, path=path)
    for shape in [(70,), (3, 70), (2, 4, 70), (1, 1, 1, 70)]:   # any leading dims, incl. none
        x = torch.randn(*shape)
        torch.testing.assert_close(sp(x), lin(x), rtol=0, atol=1e-5)
    assert sp(torch.randn(0, 70)).shape == (0, 37)


def test_sparse_linear_refusals_and_dtype_conversion():
    sp = SparseLinear.from_dense(masked(8, 16, 0.5))
    with pytest.raises(ValueError, match="features"):
        sp(torch.randn(2, 15))
    with pytest.raises(TypeError, match="convert the model"):
        sp(torch.randn(2, 16).double())
    with pytest.raises(ValueError, match="path"):
        SparseLinear.from_dense(masked(8, 16, 0.5), path="cusparse")
    sp.to(torch.float16)
    assert sp.values.dtype == torch.float16 and sp.bitmap.dtype == torch.uint8 and sp.tile_offsets.dtype == torch.int32
    with pytest.raises(ValueError, match="tiel"):
        SparseLinearConfig(tiel=(16, 16))


def test_cpu_rule_is_monotone_in_sparsity():
    for numel in (2**20, 2**24):
        for n in (1, 8, 32, 64, 256, 4096):
            picks = [cpu.cpu_path(n, s / 100, numel) for s in range(0, 100)]
            assert picks == sorted(picks, key=lambda p: p == "csr")   # dense ... dense csr ... csr
    assert cpu.cpu_path(1, 0.7, 2**20) == "csr" and cpu.cpu_path(1, 0.7, 2**24) == "dense"
    assert cpu.cpu_path(8, 0.5, 2**20) == "dense" and cpu.cpu_path(4096, 0.7, 2**20) == "dense"


# ------------------------------------------------------------------------------------------- the swap

FAMILIES = ["llama", "gpt2", "qwen2", "opt", "phi3", "gemma"]   # gpt2: Conv1D; qwen2 / opt: biases


@pytest.mark.parametrize("path", ["auto", "csr"])
@pytest.mark.parametrize("family", FAMILIES)
def test_swap_keeps_logits_and_generate(family, path):
    """Every masked block linear swapped; logits within fp32 atol 1e-5; greedy generate() gives the same tokens."""
    from shear.sparse import SparsifyConfig, sparsify_

    model = family_model(family)
    res = sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.7))
    ids = torch.randint(0, 128, (2, 7))
    ref, gen_ref = outputs(model, ids), model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    swapped = to_sparse_linear_(model, SparseLinearConfig(path=path))
    assert swapped == res.pruned
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in swapped)
    torch.testing.assert_close(outputs(model, ids), ref, rtol=0, atol=1e-5)
    gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref)


def test_swap_refuses_and_warns(caplog):
    from shear.sparse import SparsifyConfig, sparsify_

    with pytest.raises(ValueError, match="no linear"):
        to_sparse_linear_(family_model("llama"))
    model = family_model("llama")
    sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.7, targets=["mlp.down_proj"]))
    with pytest.raises(ValueError, match="below min_sparsity"):
        to_sparse_linear_(model, SparseLinearConfig(targets=["q_proj"]))
    with caplog.at_level(logging.WARNING, logger="shear"):
        swapped = to_sparse_linear_(model)
    assert swapped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "kept dense" in caplog.text and "q_proj" in caplog.text


# ------------------------------------------------------------------------------------------- GPU

@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 16, 33, 64, 300])
def test_gpu_kernel_matches_reference(dtype, n):
    from shear.kernels.triton_kernel import bitmap_linear

    for out, inp, s in [(4096, 4096, 0.7), (1000, 3000, 0.5), (37, 70, 0.9)]:
        f = encode(masked(out, inp, s, dtype).cuda())
        x = torch.randn(n, inp, device="cuda").to(dtype)
        b = torch.randn(out, device="cuda").to(dtype)
        y, ref = bitmap_linear(x, f, b), reference_linear(x, f, b)
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(bitmap_linear(x, f, b).float(), y.float(), rtol=1e-2, atol=1e-2)  # split-K: not bitwise
        torch.testing.assert_close(bitmap_linear(x, f, b, split_k=1).float(), ref.float(), rtol=2e-2, atol=2e-2)


@gpu
def test_gpu_swap_generate():
    from shear.sparse import SparsifyConfig, sparsify_

    model = family_model("llama").cuda().half()
    sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.7))
    ids = torch.randint(0, 128, (2, 7), device="cuda")
    ref = outputs(model, ids)
    to_sparse_linear_(model)
    assert {m.choose_path(1, torch.device("cuda")) for m in model.modules() if isinstance(m, SparseLinear)} == {"triton"}
    torch.testing.assert_close(outputs(model, ids), ref, rtol=2e-2, atol=2e-2)
    assert model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 11)
