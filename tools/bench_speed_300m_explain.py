"""What eats the difference between achieved and ideal speedups in ``tools/bench_speed_300m.py``.

    OMP_NUM_THREADS=1 nice python tools/bench_speed_300m.py --out runs/bench-speed-300m --explain

Run after the main benchmark (it reads ``results.json`` from ``--out``). CPU clock, 1 thread:

- the three SwiGLU GEMMs alone at the MLP widths of the main run (every uniform and rounded width, a
  sample of the per-layer ``round_to`` 1 widths): does an odd width miss the fast GEMM path?
- a per-module breakdown (attention projections / attention core / MLP GEMMs / MLP elementwise /
  LM head / the rest) of one prefill pass and of decode steps at batch 1 and 8, for the dense model
  and the models at ``--explain-ratio`` (the exports the table timed when ``--keep-models`` left them
  in ``--out``, else the same plans pruned in memory);
- the fixed per-step cost of decode: a skeleton with the same 24 layers and tiny widths, timed against
  the dense model, and a least-squares line of 1/speedup on the weight-byte ratio over the main run;
- per-layer exports reloaded with ``trust_remote_code`` against the same model in memory (needs the
  exports of a ``--keep-models`` run).
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from bench_speed_300m import ALLOCS, METRICS, build_dense, clocks, load, measure, parse_args, since, \
    time_decode, time_prefill, variant_name

def time_mlp_gemms(widths: list[int], a, reps: int = 15) -> dict:
    """Median CPU seconds of the three SwiGLU GEMMs (gate, up: [M, d] x [d, n]; down: [M, n] x [n, d]) per width.

    M = the prefill length only: at M = 1 or 8 one layer's weights stay in cache when timed alone,
    which the model (24 layers) never sees, so decode is broken down on the real models instead.
    Widths are timed in rotation inside each repetition (interleaved). Returns {M: {n: s}}.
    """
    import torch.nn.functional as F

    out = {}
    for rows in (a.prefill,):
        x = torch.randn(rows, a.hidden)
        ws = {n: (torch.randn(n, a.hidden), torch.randn(n, a.hidden), torch.randn(a.hidden, n)) for n in widths}
        times = {n: [] for n in widths}
        with torch.inference_mode():
            for rep in range(reps + 1):
                for n in widths:
                    g, u, dn = ws[n]
                    t0 = clocks()
                    F.linear(F.linear(x, g) * F.linear(x, u), dn)
                    if rep:  # rep 0 warms up
                        times[n].append(since(t0)[1])
        out[rows] = {n: statistics.median(t) for n, t in times.items()}
    return out


_CATS = ("attn_proj", "attn_core", "mlp_gemm", "mlp_other", "lm_head", "rest")


@torch.inference_mode()
def breakdown(model, ids, steps: int = 0) -> dict:
    """CPU seconds per category of one prefill pass over ``ids`` (``steps=0``) or per decode step (``steps``
    greedy steps after the prompt ``ids``), from forward hooks (1 thread: the pass is sequential).

    attn_proj: q/k/v/o Linear; attn_core: the attention module minus them (RoPE, SDPA, reshapes);
    mlp_gemm: gate/up/down Linear; mlp_other: the MLP minus them (SiLU, product); lm_head; rest:
    the whole pass minus all of these (embedding, RMSNorms, residual adds, Python).
    """
    spent, start, handles = {c: 0.0 for c in _CATS}, {}, []
    head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        cat = ("lm_head" if mod is head else "attn" if name.endswith("self_attn") else "mlp" if name.endswith(".mlp")
               else "attn_proj" if ".self_attn." in name and isinstance(mod, torch.nn.Linear)
               else "mlp_gemm" if ".mlp." in name and isinstance(mod, torch.nn.Linear) else None)
        if cat is None:
            continue

        def pre(m, *args, key=name):
            start[key] = time.process_time()

        def post(m, *args, key=name, cat=cat):
            dt = time.process_time() - start[key]
            spent[{"attn": "attn_core", "mlp": "mlp_other"}.get(cat, cat)] += dt
            if cat in ("attn_proj", "mlp_gemm"):  # their time is inside the parent's too
                spent["attn_core" if cat == "attn_proj" else "mlp_other"] -= dt

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        if steps:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            spent.update({c: 0.0 for c in spent})  # the prompt's pass is not counted
            t0 = clocks()
            for _ in range(steps):
                out = model(input_ids=nxt, cache=cache, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            total = since(t0)[1]
        else:
            total = time_prefill(model, ids)[1]
    finally:
        for h in handles:
            h.remove()
    spent["rest"] = total - sum(spent.values())
    spent["total"] = total
    return {c: v / max(steps, 1) for c, v in spent.items()}


def skeleton(a) -> torch.nn.Module:
    """Same depth and op sequence as the dense model, tiny widths: its decode step is the fixed cost."""
    b = copy.copy(a)
    b.hidden, b.heads, b.kv_heads, b.intermediate, b.vocab = 128, 2, 1, 64, 256
    return build_dense(b)


def decode_fit(rows: list) -> dict:
    """Least squares of dense/pruned step-time ratio (1/speedup) on the weight-byte ratio u: 1/s = alpha + beta u.

    Ideal: alpha = 0, beta = 1. alpha is the share of the dense step that does not shrink with weights.
    """
    out = {}
    for k in ("decode_b1", "decode_b8", "prefill"):
        u = [1 / r["ideal"][k] for r in rows]
        y = [1 / r["speedup"][k] for r in rows]
        mu, my = statistics.fmean(u), statistics.fmean(y)
        beta = sum((x - mu) * (z - my) for x, z in zip(u, y)) / sum((x - mu) ** 2 for x in u)
        out[k] = {"alpha": my - beta * mu, "beta": beta}
    return out


def explain(a, out: Path) -> dict:
    """The measurements behind the reading in docs/BENCHMARKS.md (see the module docstring)."""
    res = json.loads((out / "results.json").read_text())
    widths = sorted({a.intermediate} | {w for r in res["rows"] for w in r["widths"]["intermediate"]
                                        if r["model"].startswith("uniform") or w % 64 == 0})
    odd = sorted({w for r in res["rows"] if r["model"].startswith("global") and r["model"].endswith("r1")
                  for w in r["widths"]["intermediate"]})
    widths = sorted(set(widths) | set(odd[:: max(1, len(odd) // 12)]))
    gemm = time_mlp_gemms(widths, a)
    print("gemm done", flush=True)
    names = [variant_name(al, a.explain_ratio, rt) for al in ALLOCS for rt in a.round_to]
    if all((out / n / "config.json").exists() for n in ["dense"] + names):  # the exports the table timed
        models = {n: load(out / n) for n in ["dense"] + names}
    else:
        models = {"dense": build_dense(a)}
        models.update({n: _prune(models["dense"], n, a) for n in names})
    dense = models["dense"]
    g = torch.Generator().manual_seed(1)
    runs = {"prefill": (torch.randint(0, a.vocab, (1, a.prefill), generator=g), 0),
            "decode_b1": (torch.randint(0, a.vocab, (1, a.prompt), generator=g), a.decode),
            "decode_b8": (torch.randint(0, a.vocab, (8, a.prompt), generator=g), a.decode)}
    parts = {k: {n: [] for n in models} for k in runs}
    for rep in range(4):
        for n, m in models.items():
            for k, (ids, steps) in runs.items():
                b = breakdown(m, ids, steps)
                if rep:  # rep 0 warms up
                    parts[k][n].append(b)
    parts = {k: {n: {c: statistics.median(b[c] for b in bs) for c in bs[0]} for n, bs in p.items()} for k, p in parts.items()}
    ideal = {n: _part_cost(m, a.prefill) for n, m in models.items()}
    print("breakdown done", flush=True)
    remote = _remote_vs_memory(models, out, a)
    skel = skeleton(a)
    p1, p8 = (torch.randint(0, 256, (b, a.prompt)) for b in (1, 8))
    fixed = {"b1": [], "b8": []}
    for _ in range(5):
        for b, p in (("b1", p1), ("b8", p8)):
            fixed[b].append(time_decode(skel, p, a.decode)[1] / time_decode(dense, p % a.vocab, a.decode)[1])
    return {"gemm": {str(k): {str(n): t for n, t in v.items()} for k, v in gemm.items()}, "odd_widths_sampled": len(odd),
            "breakdown": parts, "part_cost": ideal, "decode_fit": decode_fit(res["rows"]),
            "skeleton_step_share": {b: statistics.median(v) for b, v in fixed.items()}, "remote_vs_memory": remote,
            "threads": torch.get_num_threads()}


def _prune(dense, name: str, a):
    """The model ``name`` (e.g. global-50-r64) pruned in memory, as the main run pruned it before export."""
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune

    alloc, pct, rt = name.split("-")
    cfg = PruneConfig(target={"ratio": int(pct) / 100}, allocation=alloc, round_to=int(rt[1:]))
    return run_prune(copy.deepcopy(dense), None, cfg, ImportanceConfig(estimator="magnitude_l2"))[0]


def _remote_vs_memory(models: dict, out: Path, a, reps: int = 3) -> dict:
    """Speed of per-layer exports reloaded with trust_remote_code over the same model pruned in memory.

    Needs the exports of a ``--keep-models`` run in ``out``; {} otherwise.
    """
    res = {}
    for n in (n for n in models if n.startswith("global") and (out / n / "config.json").exists()):
        loaded, mem = load(out / n), _prune(build_dense(a), n, a)
        if sorted(tuple(p.shape) for p in loaded.parameters()) != sorted(tuple(p.shape) for p in mem.parameters()):
            raise ValueError(f"{n}: the export in {out} does not match the model pruned here")
        r = {k: [] for k in METRICS}
        for _ in range(reps):
            m, l = measure(mem, a), measure(loaded, a)
            for k in METRICS:
                r[k].append(l[k] / m[k])
        res[n] = {k: statistics.median(v) for k, v in r.items()}
        del loaded, mem
    return res


def _part_cost(model, prefill: int) -> dict:
    """What each part's ideal scales with: prefill MACs, decode weight bytes (= linear MACs x 4 per token)."""
    from shear.eval.cost import attention_widths, linear_macs_per_token

    lin = linear_macs_per_token(model)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    proj, mlp = (sum(v for k, v in lin.items() if part in k) for part in (".self_attn.", ".mlp."))
    prefill_cost = {"attn_proj": prefill * proj, "mlp_gemm": prefill * mlp,
                    "attn_core": sum(dq + dv for _, dq, dv in attention_widths(model)) * prefill * (prefill + 1) / 2}
    decode_cost = {"attn_proj": 4 * proj, "mlp_gemm": 4 * mlp, "lm_head": 4 * lin[head]}
    return {"prefill": prefill_cost, "decode_b1": decode_cost, "decode_b8": decode_cost}


def explain_text(e: dict) -> str:
    lines = ["MLP GEMMs alone (gate+up+down), time vs dense width and efficiency = (t_dense/t)/(n_dense/n):"]
    for rows, t in e["gemm"].items():
        n0 = str(max(int(n) for n in t))
        lines.append(f"  M={rows}: " + ", ".join(f"{n}:{t[n] * 1e3:.2f}ms/{t[n0] / t[n] * int(n) / int(n0):.2f}"
                                                 for n in sorted(t, key=int)))
    for k, parts in e["breakdown"].items():
        lines.append(f"{k} breakdown, CPU ms [dense/pruned] (ideal of the part: MACs for prefill, bytes for decode):")
        d = parts["dense"]
        for n, b in parts.items():
            cells = []
            for c in _CATS + ("total",):
                m = e["part_cost"]
                ratio = f" ({m['dense'][k][c] / m[n][k][c]:.2f}x)" if c in m[n][k] and n != "dense" else ""
                cells.append(f"{c} {b[c] * 1e3:.1f}{'' if n == 'dense' else f' [{d[c] / b[c]:.2f}x]'}{ratio}")
            lines.append(f"  {n}: " + ", ".join(cells))
    lines.append(f"decode fit 1/speedup = alpha + beta * bytes ratio: {e['decode_fit']}")
    lines.append(f"skeleton (24 layers, tiny widths) step / dense step: {e['skeleton_step_share']}")
    lines.append(f"reloaded with trust_remote_code / in memory, rate ratio: {e['remote_vs_memory']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python tools/bench_speed_300m.py --out OUT --explain`` runs this: the same flags, the main run's results."""
    from transformers.utils import logging as hf_logging

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    hf_logging.disable_progress_bar()
    res = explain(a, a.out)
    (a.out / "explain.json").write_text(json.dumps(res, indent=1))
    print(explain_text(res))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
