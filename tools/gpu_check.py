"""GPU check: shear's GPU code paths on one GPU, offline, in minutes; one JSON of times, peak memory and verdicts.

    python tools/gpu_check.py --out runs/gpu-check.json                                  # one H100: < 8 min, no network
    TRITON_INTERPRET=1 python tools/gpu_check.py --device cpu --tiny --out /tmp/gc.json  # the same code on CPU (tests)

Without a CUDA device (and without ``--device cpu``) it prints ``gpu_check: skipped, no CUDA device`` and
exits 0, writing nothing. The model is built in-process with random weights (speed and code paths do not
depend on the values): ``--layers`` (default 4) decoder layers of Llama-3-8B's shape (hidden 4096, MLP 14336,
32 query / 8 KV heads of 128, vocab 128256, RoPE theta 500000) in bf16, on the GPU. ``--tiny``: hidden 64,
MLP 224, 4 / 2 heads, vocab 512, 2 layers, fp32 (for CPU runs). Calibration and training text are random
token ids. Steps, each guarded (a failure is recorded and the next step runs):

1. ``prune_flap``: ``shear.prune.pipeline.run_prune`` (FLAP, heads within KV groups + MLP, uniform, 30% of the
   parameters) with ``importance.device`` set to the device; checks the parameter count dropped, every
   parameter is still on the device, the pruned logits are finite.
2. ``prune_stream``: the same prune through ``shear.prune.stream.prune_streamed`` (the dense model saved in its
   dtype with 1 GB shards, its blocks read one at a time onto the device); checks the export loads with plain
   ``from_pretrained`` (no missing / unexpected keys) and gives finite logits, and reports whether its tensors
   equal step 1's (``same_tensors_as_in_memory``).
3. ``sparsify_wanda`` and 4. ``sparsify_sparsegpt``: ``shear.sparse.pipeline.run_sparsify`` at 50% with
   ``sparsify.device``; checks the achieved sparsity of the pruned linears is 50% +- 1% and the logits are finite.
5. ``kd_train``: a few steps of ``shear.train.trainer.train`` (accelerate, one process; LoRA r=16, gradient
   checkpointing, bf16 autocast on GPU, CE + KD from the dense model, chunked logits); checks every logged
   loss is finite. The student is the pruned model (the dense one when step 1 failed).
6. ``sparse_kernel``: ``shear.kernels.triton_kernel.bitmap_linear`` against the dense product of the decoded
   weight (max |error| / max |reference| <= 2e-2 in bf16) and timed against cuBLAS ``F.linear`` on
   Llama-3-8B's projection shapes at 50% / 70% sparsity for 1 and 16 tokens. On CPU it needs
   ``TRITON_INTERPRET=1`` (fp32, tiny shapes; the times are the interpreter's) and is skipped otherwise.

JSON (``--out``)::

    {"schema": "shear-gpu-check/1",
     "ok": true,                            # every step passed or was skipped
     "device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "torch": "...", "triton": "..." | null,
     "shear": "0.1.0", "started": "2026-12-06T16:00:00Z", "wall_s": 123.4, "tiny": false,
     "model": {"layers": 4, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "params": 1_921_000_000, "dtype": "bf16"},
     "steps": [{"name": "prune_flap",
                "status": "pass" | "fail" | "skip",
                "error": null | "ValueError: ... (the exception's first line) ",
                "traceback": null | "the last lines of the traceback",
                "time_s": 12.3,               # wall time of the step
                "peak_gpu_bytes": 8123456789, # torch.cuda.max_memory_allocated during the step (null on CPU;
                                              # run_prune / run_sparsify reset the counter when they start, so a
                                              # transient peak of the step before that is not seen)
                "details": {...}},            # step-specific figures, e.g. params_before / params_after,
               ...]}                          # pruned_sparsity, losses, kernel rows (us, speedup, error)

The exit code is 0 when every step passed (or was skipped), 1 when one failed.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512, rope_theta=500000.0, max_position_embeddings=256, rms_norm_eps=1e-5)
KERNEL_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down: [out, in]
TINY_KERNEL_SHAPES = [(64, 64), (224, 64)]


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY if args.tiny else LLAMA3_8B
    cfg = LlamaConfig(**shape, num_hidden_layers=args.layers, tie_word_embeddings=False, use_cache=False,
                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def logits_finite(model, ids: torch.Tensor) -> bool:
    dev = next(model.parameters()).device
    with torch.no_grad():
        return bool(torch.isfinite(model(input_ids=ids[:1].to(dev), use_cache=False).logits.float()).all())


def _prune_configs(ctx):
    from shear.prune.config import ImportanceConfig, PruneConfig

    pcfg = PruneConfig(target={"ratio": 0.3}, structures=["heads", "mlp"], heads="query_head", allocation="uniform",
                       round_to=8 if ctx["args"].tiny else 128)
    icfg = ImportanceConfig(estimator="flap", device=ctx["device_name"], n_samples=ctx["ids"].shape[0],
                            seq_len=ctx["ids"].shape[1], batch_size=4)
    return pcfg, icfg


def step_prune(ctx) -> dict:
    from shear.prune.pipeline import run_prune

    model = copy.deepcopy(ctx["dense"])
    before = sum(p.numel() for p in model.parameters())
    pcfg, icfg = _prune_configs(ctx)
    model, _, report = run_prune(model, None, pcfg, icfg, ids=ctx["ids"])
    after = sum(p.numel() for p in model.parameters())
    devices = sorted({str(p.device) for p in model.parameters()})
    finite = logits_finite(model, ctx["ids"])
    if not (after < before and devices == [str(ctx["device"])] and finite):
        raise AssertionError(f"prune: params {before} -> {after}, devices {devices}, finite logits {finite}")
    ctx["pruned"] = model
    return {"params_before": before, "params_after": after, "removed_ratio": round(1 - after / before, 4),
            "time_s": report["time_s"], "cuda_peak_mb": report.get("cuda_peak_mb")}


def step_prune_stream(ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from shear.models import SHORT
    from shear.prune.stream import prune_streamed

    pcfg, icfg = _prune_configs(ctx)
    dtype = next(ctx["dense"].parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="gpu-check-stream-") as tmp:
        src, out = Path(tmp) / "dense", Path(tmp) / "pruned"
        ctx["dense"].save_pretrained(src, max_shard_size="1GB")
        report = prune_streamed(src, None, pcfg, icfg, export_dir=out, written=SHORT[dtype], compute=SHORT[dtype],
                                ids=ctx["ids"])
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
        keys = {k: v[:3] for k, v in info.items() if v}
        finite = logits_finite(model.to(ctx["device"]), ctx["ids"])
        same = None
        if ctx.get("pruned") is not None:  # step 1's in-memory result on the same device
            want, got = ctx["pruned"].state_dict(), model.state_dict()
            same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        params = sum(p.numel() for p in model.parameters())
        del model
    if keys or not finite:
        raise AssertionError(f"prune --stream: loading info {keys}, finite logits {finite}")
    return {"params_after": params, "same_tensors_as_in_memory": same, "time_s": report["time_s"],
            "cuda_peak_mb": report.get("cuda_peak_mb"), "vm_hwm_mb": report.get("vm_hwm_mb")}


def step_sparsify(method: str):
    def run(ctx) -> dict:
        from shear.sparse.config import SparsifyConfig
        from shear.sparse.pipeline import run_sparsify

        model = copy.deepcopy(ctx["dense"])
        cfg = SparsifyConfig(method=method, sparsity=0.5, device=ctx["device_name"], n_samples=ctx["ids"].shape[0],
                             seq_len=ctx["ids"].shape[1])
        model, report = run_sparsify(model, None, cfg, ids=ctx["ids"])
        finite = logits_finite(model, ctx["ids"])
        del model
        if abs(report["pruned_sparsity"] - 0.5) > 0.01 or not finite:
            raise AssertionError(f"{method}: sparsity {report['pruned_sparsity']}, finite logits {finite}")
        return {"pruned_sparsity": report["pruned_sparsity"], "linears": len(report["pruned"]),
                "time_s": report["time_s"]}
    return run


def step_kd(ctx) -> dict:
    from shear.train.config import DistillConfig, TrainConfig
    from shear.train.trainer import train

    args, ids = ctx["args"], ctx["train_ids"]
    student = ctx.get("pruned") or copy.deepcopy(ctx["dense"])
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    gpu = ctx["device"].type == "cuda"
    cfg = TrainConfig(steps=args.kd_steps, batch_size=2, lr=1e-4, precision="bf16" if gpu else "fp32",
                      gradient_checkpointing=True, lora={"r": 16, "alpha": 32}, eval_batches=1, log_every=1,
                      resume=False)
    distill = DistillConfig(ce_weight=0.5, kd_weight=0.5, chunk_size=1024, teacher_dtype="bf16" if gpu else "fp32")
    with tempfile.TemporaryDirectory(prefix="gpu-check-kd-") as out:
        res = train(student, data[:-2], data[-2:], cfg, out, teacher=ctx["dense"], distill=distill)
        losses = [json.loads(ln)["loss"] for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in ln]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"kd: losses {losses}")
    return {"student": "pruned" if ctx.get("pruned") is not None else "dense (prune failed)", "losses": losses,
            "tokens_per_s": res.metrics.get("tokens_per_s"), "steps": res.metrics.get("steps")}


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call after warm-up (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_kernel(ctx) -> dict:
    dev, args = ctx["device"], ctx["args"]
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise _Skip("Triton needs a CUDA device (set TRITON_INTERPRET=1 before the run to interpret it on CPU)")
    from shear.kernels.format import decode, encode
    from shear.kernels.triton_kernel import bitmap_linear

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter computes bf16 wrongly
    rows, bad = [], []
    g = torch.Generator(device=dev).manual_seed(0)
    for out, inp in TINY_KERNEL_SHAPES if args.tiny else KERNEL_SHAPES:
        for sparsity in (0.5, 0.7):
            w = torch.randn(out, inp, generator=g, device=dev)
            w[torch.rand(out, inp, generator=g, device=dev) < sparsity] = 0
            w = w.to(dtype)
            fmt = encode(w)
            for n in (1, 16):
                x = torch.randn(n, inp, generator=g, device=dev).to(dtype)
                y = bitmap_linear(x, fmt)
                ref = F.linear(x.float(), decode(fmt).float())
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
                reps = 2 if dev.type != "cuda" else 50
                t_k = _time(lambda: bitmap_linear(x, fmt), dev, reps)
                t_d = _time(lambda: F.linear(x, w), dev, reps)
                rows.append({"shape": f"{out}x{inp}", "sparsity": sparsity, "N": n, "kernel_us": t_k * 1e6,
                             "dense_us": t_d * 1e6, "speedup_vs_dense": t_d / t_k, "max_rel_error": err})
                if not err <= 2e-2:
                    bad.append(rows[-1])
    if bad:
        raise AssertionError(f"kernel: {len(bad)} of {len(rows)} products off the reference, e.g. {bad[0]}")
    return {"dtype": str(dtype).removeprefix("torch."), "rows": rows,
            "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}


class _Skip(Exception):
    """A step that cannot run here (not a failure)."""


STEPS = [("prune_flap", step_prune), ("prune_stream", step_prune_stream), ("sparsify_wanda", step_sparsify("wanda")),
         ("sparsify_sparsegpt", step_sparsify("sparsegpt")), ("kd_train", step_kd), ("sparse_kernel", step_kernel)]


def run_step(name: str, fn, ctx: dict, budget_left: float) -> dict:
    rec = {"name": name, "status": "pass", "error": None, "traceback": None, "time_s": None, "peak_gpu_bytes": None,
           "details": {}}
    if budget_left <= 0:
        rec.update(status="skip", error="time budget (--budget-s) spent before this step")
        return rec
    cuda = ctx["device"].type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(ctx["device"])
    t0 = time.perf_counter()
    try:
        rec["details"] = fn(ctx)
    except _Skip as e:
        rec.update(status="skip", error=str(e))
    except Exception as e:  # noqa: BLE001 - every failure is recorded; the next step still runs
        first = (str(e).strip().splitlines() or [""])[0]
        rec.update(status="fail", error=f"{type(e).__name__}: {first}",
                   traceback="".join(traceback.format_exception(e)[-6:]))
    if cuda:
        torch.cuda.synchronize()
        rec["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(ctx["device"]))
        torch.cuda.empty_cache()
    rec["time_s"] = round(time.perf_counter() - t0, 3)
    print(f"gpu_check: {name}: {rec['status']} in {rec['time_s']:.1f} s"
          + (f", peak {rec['peak_gpu_bytes'] / 1e9:.2f} GB" if rec["peak_gpu_bytes"] is not None else "")
          + (f" ({rec['error']})" if rec["error"] else ""), flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-check.json", help="where the JSON goes")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (to test this script)")
    p.add_argument("--tiny", action="store_true", help="a tiny fp32 model instead of Llama-3-8B's shape (CPU runs)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; --tiny 2)")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (default 32; --tiny 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --tiny 32)")
    p.add_argument("--kd-steps", type=int, default=4, help="optimizer steps of the KD check")
    p.add_argument("--budget-s", type=float, default=420.0, help="steps not started by then are skipped")
    args = p.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device")
        return 0
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device")
        return 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.layers = args.layers or (2 if args.tiny else 4)
    n, seq = args.samples or (4 if args.tiny else 32), args.seq_len or (32 if args.tiny else 512)
    dtype = torch.float32 if args.tiny or device.type != "cuda" else torch.bfloat16
    t_start, started = time.perf_counter(), dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    dense = build_model(args, device, dtype)
    vocab = dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ctx = {"args": args, "device": device, "device_name": str(device), "dense": dense,
           "ids": torch.randint(vocab, (n, seq), generator=g), "train_ids": torch.randint(vocab, (10, seq), generator=g)}
    c = dense.config
    result = {"schema": "shear-gpu-check/1", "ok": None, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "triton": _triton_version(), "shear": _shear_version(),
              "python": platform.python_version(), "started": started, "wall_s": None, "tiny": args.tiny,
              "model": {"layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
                        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
                        "num_key_value_heads": c.num_key_value_heads, "vocab_size": vocab,
                        "params": sum(q.numel() for q in dense.parameters()),
                        "dtype": str(dtype).removeprefix("torch."), "calibration": [n, seq]},
              "steps": []}
    for name, fn in STEPS:
        result["steps"].append(run_step(name, fn, ctx, args.budget_s - (time.perf_counter() - t_start)))
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    result["ok"] = all(s["status"] != "fail" for s in result["steps"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {result['wall_s']:.0f} s -> {out}")
    return 0 if result["ok"] else 1


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _shear_version() -> str:
    import shear

    return shear.__version__


if __name__ == "__main__":
    sys.exit(main())
