"""Sparse linear: the bitmap kernel vs dense vs 2:4, per shape, sparsity and token count; and decode tokens/s.

    python tools/bench_sparse_kernel.py --out runs/bench-sparse-kernel.json            # GPU, < 5 min on H100/H200
    python tools/bench_sparse_kernel.py --device cpu --quick --threads 1               # CPU rows (docs/BENCHMARKS.md)
    python tools/bench_sparse_kernel.py --sweep                                        # GPU: split_k x num_warps grid

GPU (``--device cuda``): weights W ``[out, in]`` of 4096x4096, 11008x4096, 4096x11008, 14336x4096 in fp16
with random unstructured masks at 50/70/80/90%, X ``[N, in]`` with N = 1, 8, 16, 32, 64. Columns: the
Triton kernel (shear.kernels.triton_kernel), cuBLAS dense (``F.linear`` = torch.matmul), torch's 2:4
semi-structured (50% by construction, same row for every sparsity), the kernel's achieved GB/s
((format + X + Y bytes) / time) and its time over the byte floor (format bytes / peak bandwidth;
peak = the nominal HBM figure of the GPU, else a measured device copy). Each timing replays a CUDA
graph of one call per weight copy, with enough copies to exceed twice the L2 cache, so no weight is
read from L2; the time is per call.

CPU (``--device cpu``): the SparseLinear CPU paths (shear.kernels.cpu): dense GEMM and CSR in fp32,
timed interleaved (dense, csr, dense, csr, ...; median per path) so a load change on the shared
machine hits both; the rule's pick next to the measured fastest and what the pick costs over it
(``regret``). BSR and the reference decode are timed on one shape to show why the rule never picks
them. ``--quick`` shrinks the shapes to 1024x1024, 2816x1024, 1024x2816 plus 4096x4096.

End to end: greedy decode tokens/s at batch 1 (rate from the difference of two generation lengths,
as shear.eval.speed) of one random-init Llama in three forms: dense; structured-pruned (shear's
run_prune, magnitude, heads + MLP, uniform) to the non-zero parameter count of the third; and 70%
unstructured (magnitude, shear.sparse) with every block linear swapped to SparseLinear (CPU adds an
80% model). Random
weights: speed does not depend on the values. GPU: 8 layers of Llama-2-7B's shape; CPU: 4 layers of
hidden 1024 / MLP 2816 (``--quick``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
QUICK_SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816), (4096, 4096)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9]
TOKENS = [1, 8, 16, 32, 64]
CPU_TOKENS = TOKENS + [256]  # 256: the prefill side of the CPU rule
PEAK_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864,
            "L4": 300, "A10": 600, "RTX 4090": 1008}


def machine(device: str) -> dict:
    out = benchlib.machine()
    if device == "cuda":
        import triton

        out.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    return out


def masked(out: int, inp: int, sparsity: float, dtype, device, seed: int = 0) -> torch.Tensor:
    """A random ``[out, in]`` weight with a random unstructured mask of exactly ``sparsity`` per matrix."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out, inp, generator=g, device=device, dtype=torch.float32)
    drop = torch.randperm(w.numel(), generator=g, device=device)[: round(sparsity * w.numel())]
    w.view(-1)[drop] = 0
    return w.to(dtype)


# ---------------------------------------------------------------------------------------------- GPU

def gpu_peak_gbs(override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-gbs"
    name = torch.cuda.get_device_name()
    for key, gbs in PEAK_GBS.items():
        if key in name:
            return float(gbs), f"nominal {key}"
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(buf)
    torch.cuda.synchronize()
    return 2 * 10 * buf.numel() / (time.perf_counter() - t0) / 1e9, "measured device copy"


def copies_for(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    return max(2, min(64, math.ceil(2 * l2 / max(nbytes, 1))))


def time_calls(calls: list, reps: int = 20) -> tuple[float, str]:
    """Seconds per call: a CUDA graph of one pass over ``calls`` (one per weight copy), replayed ``reps``
    times; eager with a sync at the end when capture fails."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        graph.replay()
        torch.cuda.synchronize()
        run, how = graph.replay, "graph"
    except Exception:  # noqa: BLE001 - some ops cannot be captured; time them eagerly
        def run():
            for c in calls:
                c()
        how = "eager"
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * len(calls)), how


def semi_structured(w: torch.Tensor):
    """torch's 2:4 form of ``w`` (magnitude 2:4 mask) or the reason it is unavailable."""
    from shear.sparse.masks import nm_mask

    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(w * nm_mask(w.abs().float(), 2, 4).to(w.dtype)), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def gpu_rows(a) -> list[dict]:
    from shear.kernels.format import encode
    from shear.kernels.triton_kernel import bitmap_linear

    dtype = getattr(torch, a.dtype)
    peak, peak_src = gpu_peak_gbs(a.peak_gbs)
    print(f"peak bandwidth {peak:.0f} GB/s ({peak_src})")
    rows = []
    for out, inp in SHAPES:
        w_dense = masked(out, inp, 0.0, dtype, "cuda")
        dense_w = [w_dense.clone() for _ in range(copies_for(w_dense.numel() * w_dense.element_size()))]
        w24, why24 = semi_structured(w_dense)
        n24 = copies_for(w_dense.numel())  # 2:4 keeps about half of the fp16 bytes
        w24s = [w24] + [semi_structured(w_dense)[0] for _ in range(n24 - 1)] if w24 is not None else []
        fmts = {}
        for s in SPARSITIES:
            fmt = encode(masked(out, inp, s, dtype, "cuda", seed=1), tile=tuple(a.tile))
            fmts[s] = [fmt] + [_clone(fmt) for _ in range(copies_for(fmt.nbytes()) - 1)]
        for n in TOKENS:
            x = torch.randn(n, inp, dtype=dtype, device="cuda")
            t_dense, _ = time_calls([lambda w=w: F.linear(x, w) for w in dense_w])
            t24 = None
            if w24s:
                try:
                    t24 = time_calls([lambda w=w: F.linear(x, w) for w in w24s])[0]
                except Exception as e:  # noqa: BLE001 - e.g. an input shape the 2:4 kernels refuse
                    why24 = f"N={n}: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            for s in SPARSITIES:
                fmt = fmts[s][0]
                t, how = time_calls([lambda f=f: bitmap_linear(x, f) for f in fmts[s]])
                moved = fmt.nbytes() + (x.numel() + n * out) * x.element_size()
                floor = fmt.nbytes() / (peak * 1e9)
                rows.append({"shape": f"{out}x{inp}", "N": n, "sparsity": s, "kernel_us": t * 1e6,
                             "dense_us": t_dense * 1e6, "semi24_us": None if t24 is None else t24 * 1e6,
                             "semi24_note": why24, "speedup_vs_dense": t_dense / t, "kernel_gbs": moved / t / 1e9,
                             "floor_us": floor * 1e6, "time_over_floor": t / floor, "format_bytes": fmt.nbytes(),
                             "timing": how})
                print(_gpu_line(rows[-1]), flush=True)
        del dense_w, w24s, fmts
        torch.cuda.empty_cache()
    _verdict(rows)
    return rows


def _verdict(rows: list[dict]) -> None:
    """The issue's GPU target: >= 1.5x cuBLAS at 70% for N <= 16 on 4096x11008-class shapes, <= 1.3x the floor."""
    sel = [r for r in rows if r["sparsity"] == 0.7 and r["N"] <= 16 and r["shape"] in ("4096x11008", "11008x4096")]
    if sel:
        worst_speed = min(r["speedup_vs_dense"] for r in sel)
        worst_floor = max(r["time_over_floor"] for r in sel)
        ok = worst_speed >= 1.5 and worst_floor <= 1.3
        print(f"target (70%, N <= 16, 4096x11008 / 11008x4096): worst {worst_speed:.2f}x cuBLAS, "
              f"worst {worst_floor:.2f}x the byte floor -> {'met' if ok else 'NOT met'}")


def _clone(fmt):
    from shear.kernels.format import BitmapTiles

    return BitmapTiles(fmt.shape, fmt.tile, fmt.bitmap.clone(), fmt.values.clone(), fmt.tile_offsets.clone())


def _gpu_line(r: dict) -> str:
    s24 = f"{r['semi24_us']:.1f}" if r["semi24_us"] is not None else "n/a"
    return (f"| {r['shape']} | {r['N']} | {r['sparsity']:.0%} | {r['kernel_us']:.1f} | {r['dense_us']:.1f} | {s24} | "
            f"{r['speedup_vs_dense']:.2f}x | {r['kernel_gbs']:.0f} | {r['floor_us']:.1f} | {r['time_over_floor']:.2f} |")


def gpu_sweep(a) -> list[dict]:
    """split_k x num_warps for 4096x11008 at 70%: the data to retune ``launch_config``."""
    from shear.kernels.format import encode
    from shear.kernels.triton_kernel import bitmap_linear, launch_config

    dtype = getattr(torch, a.dtype)
    fmt = encode(masked(4096, 11008, 0.7, dtype, "cuda"), tile=tuple(a.tile))
    fmts = [fmt] + [_clone(fmt) for _ in range(copies_for(fmt.nbytes()) - 1)]
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n in (1, 16, 64):
        x = torch.randn(n, 11008, dtype=dtype, device="cuda")
        for split in (1, 2, 4, 8, 16, 32):
            for warps in (2, 4, 8):
                t, _ = time_calls([lambda f=f: bitmap_linear(x, f, split_k=split, num_warps=warps) for f in fmts])
                rows.append({"N": n, "split_k": split, "num_warps": warps, "us": t * 1e6,
                             "heuristic_split": launch_config(n, fmt, sm)["split_k"]})
                print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- CPU

def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per call of each function, timed in alternation."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_copy_gbs() -> float:
    src = torch.ones(2**26)  # 256 MiB
    dst = torch.empty_like(src)
    best = min(interleaved({"c": lambda: dst.copy_(src)}, 5).values())
    return 2 * src.numel() * 4 / best / 1e9


def l3_bytes() -> int:
    try:
        sizes = [Path(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size").read_text().strip() for i in range(4)]
        return max(int(x[:-1]) * {"K": 2**10, "M": 2**20}[x[-1]] for x in sizes)
    except (OSError, ValueError, KeyError):
        return 32 * 2**20


def rotating(path: str, rep, x: torch.Tensor, copies: int):
    """A call that multiplies by the next of ``copies`` clones of ``rep`` (so the cache cannot hold them)."""
    from shear.kernels import cpu

    reps = [rep] + [rep.clone() for _ in range(copies - 1)]
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return cpu.apply(path, reps[state["i"]], x, None)
    return call


def cpu_rows(a) -> list[dict]:
    from shear.kernels import cpu
    from shear.kernels.format import encode

    peak, l3 = cpu_copy_gbs(), l3_bytes()
    print(f"CPU copy bandwidth {peak:.1f} GB/s (read + write, 256 MiB, {torch.get_num_threads()} threads); "
          f"weights rotated over > 2 x L3 ({l3 / 2**20:.0f} MiB)")
    rows = []
    for out, inp in QUICK_SHAPES if a.quick else SHAPES:
        copies = max(2, min(32, math.ceil(2 * l3 / (out * inp * 4))))
        for s in SPARSITIES:
            fmt = encode(masked(out, inp, s, torch.float32, "cpu"))
            reps = {p: cpu.build(fmt, p) for p in ("dense", "csr")}
            for n in CPU_TOKENS:
                x = torch.randn(n, inp)
                big = out * inp * n >= 2**26
                calls = {p: rotating(p, reps[p], x, copies) for p in reps}
                t = interleaved(calls, 5 if big else 11)
                pick, best = cpu.cpu_path(n, s, out * inp), min(t, key=t.get)
                floor = fmt.nbytes() / (peak * 1e9)
                csr_bytes = fmt.nnz * 8 + 4 * (out + 1)
                rows.append({"shape": f"{out}x{inp}", "N": n, "sparsity": s, "dense_ms": t["dense"] * 1e3,
                             "csr_ms": t["csr"] * 1e3, "csr_over_dense": t["csr"] / t["dense"], "rule": pick,
                             "fastest": best, "regret": t[pick] / t[best], "dense_gbs": out * inp * 4 / t["dense"] / 1e9,
                             "csr_gbs": csr_bytes / t["csr"] / 1e9, "best_over_format_floor": t[best] / floor})
                r = rows[-1]
                print(f"| {r['shape']} | {n} | {s:.0%} | {r['dense_ms']:.3f} | {r['csr_ms']:.3f} | "
                      f"{r['csr_over_dense']:.2f} | {pick} | {best} | {r['regret']:.2f} | {r['dense_gbs']:.1f} | "
                      f"{r['csr_gbs']:.1f} |", flush=True)
    return rows


def cpu_rejected() -> list[dict]:
    """BSR and the reference decode next to dense on one shape at 70%."""
    from shear.kernels import cpu
    from shear.kernels.format import encode

    fmt = encode(masked(1024, 1024, 0.7, torch.float32, "cpu"))
    reps = {p: cpu.build(fmt, p) for p in ("dense", "bsr", "reference")}
    rows = []
    for n in (1, 16):
        x = torch.randn(n, 1024)
        t = interleaved({p: (lambda p=p: cpu.apply(p, reps[p], x, None)) for p in reps}, 5)
        rows.append({"shape": "1024x1024", "sparsity": 0.7, "N": n, **{f"{p}_ms": v * 1e3 for p, v in t.items()}})
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- end to end

def e2e_models(device: str, quick: bool, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from shear.kernels import to_sparse_linear_
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune
    from shear.sparse import SparsifyConfig, sparsify_

    shape = (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=2048) if quick else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000))
    cfg = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(cfg).to(dtype).eval()
    sparse = copy.deepcopy(dense)
    sparsify_(sparse, SparsifyConfig(method="magnitude", sparsity=0.7))
    nonzero = sum(int((p != 0).sum()) for p in sparse.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device=device)
    structured, _, rep = run_prune(copy.deepcopy(dense), None, PruneConfig(target={"params": nonzero}, allocation="uniform"),
                                   ImportanceConfig(estimator="magnitude_l2"), ids=ids)
    forms = {"dense": dense, "structured": structured}
    if device == "cpu":  # and an 80% model (one more point on the CPU curve)
        s80 = copy.deepcopy(dense)
        sparsify_(s80, SparsifyConfig(method="magnitude", sparsity=0.8))
        to_sparse_linear_(s80)
        forms["sparse80+SparseLinear"] = s80
    to_sparse_linear_(sparse)
    forms["sparse70+SparseLinear"] = sparse
    info = {"config": shape, "dtype": str(dtype), "params_dense": sum(p.numel() for p in dense.parameters()),
            "nonzero_sparse": nonzero, "params_structured": rep["params_after"]}
    return forms, info


@torch.inference_mode()
def decode_rates(models: dict, device: str, prompt: int, new: int, reps: int) -> dict:
    """Decode tokens/s per model: (new - 1) / (t(new tokens) - t(1 token)), medians, models interleaved."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    ids = torch.randint(2, 2000, (1, prompt), device=device)

    def gen(m, k):
        def run():
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                       do_sample=False, use_cache=True, pad_token_id=0)
            sync()
        return run

    fns = {}
    for name, m in models.items():
        fns[(name, 1)], fns[(name, new)] = gen(m, 1), gen(m, new)
    t = interleaved(fns, reps)
    return {name: (new - 1) / max(t[(name, new)] - t[(name, 1)], 1e-9) for name in models}


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="CPU: smaller shapes and model")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="GPU dtype (CPU: fp32)")
    ap.add_argument("--tile", type=int, nargs=2, default=[32, 64], help="format tile (rows, cols)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="GPU peak bandwidth for the byte floor")
    ap.add_argument("--sweep", action="store_true", help="GPU: only the split_k x num_warps grid")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick")
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    t0 = time.time()
    res = {"machine": machine(a.device), "args": vars(a)}
    print(json.dumps(res["machine"]))
    if a.sweep:
        res["sweep"] = gpu_sweep(a)
    elif a.device == "cuda":
        print("| shape (out x in) | N | sparsity | kernel µs | cuBLAS µs | 2:4 µs | vs cuBLAS | kernel GB/s | floor µs | time / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        res["kernel"] = gpu_rows(a)
    else:
        print("| shape (out x in) | N | sparsity | dense ms | CSR ms | CSR / dense | rule | fastest | regret | dense GB/s | CSR GB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        res["cpu"] = cpu_rows(a)
        res["cpu_rejected"] = cpu_rejected()
    if not a.sweep and not a.skip_e2e:
        dtype = getattr(torch, a.dtype) if a.device == "cuda" else torch.float32
        models, info = e2e_models(a.device, a.quick or a.device == "cpu", dtype)
        rates = decode_rates(models, a.device, prompt=16, new=32 if a.device == "cpu" else 64, reps=9)
        res["e2e"] = {**info, "decode_tok_s": rates}
        print(json.dumps(res["e2e"], indent=1))
    res["wall_s"] = round(time.time() - t0, 1)
    print(f"wall {res['wall_s']} s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
