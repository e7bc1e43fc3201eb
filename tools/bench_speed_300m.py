"""Speed of exported pruned models at ~300M parameters against the ideal (issue: trust).

    OMP_NUM_THREADS=1 nice python tools/bench_speed_300m.py --out runs/bench-speed-300m --keep-models
    OMP_NUM_THREADS=1 nice python tools/bench_speed_300m.py --out runs/bench-speed-300m --explain

A random-weight Llama (hidden 1024, 24 layers, 16 query / 8 KV heads of 64, SwiGLU 2816, vocab
32000, untied LM head: 348.7M parameters, fp32) is pruned by ``run_prune`` (magnitude_l2, KV groups +
MLP channels; random calibration ids) to 20/35/50% of its parameters, uniform and global (per-layer)
allocation, ``round_to`` 1 and 64 (``--round-to``): 12 models. Each is exported
(``shear.prune.export.export``) and reloaded from disk (``trust_remote_code`` where the export has the
per-layer modeling file); the dense model is saved and reloaded the same way.

Timing, per ratio: dense and the models of that ratio in one chain ``D P P D P P D`` (order of the P's
rotated each repetition), so every pruned measurement sits between two dense ones and its speedup is
its rate over the mean rate of those two. Median over ``--reps`` repetitions. Times are CPU time of
the process (1 torch thread: the time other jobs on shared cores take is left out); wall-clock
speedups of the same passes are kept in ``results.json`` as ``*_wall``.

- prefill: one forward of ``--prefill`` tokens at batch 1, logits of the last position only (as
  ``generate`` does); ideal = dense MACs / pruned MACs of exactly that pass (linear layers x tokens,
  causal attention, LM head once).
- decode: ``--decode`` greedy steps with the KV cache after a ``--prompt``-token prompt, at batch 1
  and 8 (manual loop over ``model(input_ids=next, cache=...)``, only the steps timed); ideal = weight
  bytes read per step, dense / pruned (every parameter but the input embedding, of which one row is
  read; the LM head is counted and is not pruned). The KV cache at this context is <1% of that.

``--explain`` (after the main run, same ``--out``) measures what eats the difference; see
``tools/bench_speed_300m_explain.py``. Exports are deleted after timing unless ``--keep-models``
(~11 GB; ``--explain`` then times the very same files).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

RATIOS, ALLOCS, ROUNDS = (0.2, 0.35, 0.5), ("uniform", "global"), (1, 64)
METRICS = ("prefill", "decode_b1", "decode_b8")


def build_dense(a) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.hidden // a.heads, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def variant_name(alloc: str, ratio: float, round_to: int) -> str:
    return f"{alloc}-{round(ratio * 100)}-r{round_to}"


def prune_all(a, out: Path) -> dict:
    """Save the dense model, prune + export the 12 variants; return their run_prune reports."""
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune

    dense = build_dense(a)
    dense.save_pretrained(out / "dense")
    ids = torch.randint(0, a.vocab, (8, 128), generator=torch.Generator().manual_seed(0))
    reports = {}
    for alloc in ALLOCS:
        for ratio in a.ratios:
            for rt in a.round_to:
                name, t0 = variant_name(alloc, ratio, rt), time.time()
                cfg = PruneConfig(target={"ratio": ratio}, allocation=alloc, round_to=rt)
                _, _, rep = run_prune(copy.deepcopy(dense), None, cfg, ImportanceConfig(estimator="magnitude_l2"),
                                      export_dir=out / name, ids=ids)
                reports[name] = {k: rep[k] for k in ("removed_ratio", "params_after", "widths_after")}
                print(f"pruned+exported {name}: removed {rep['removed_ratio']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    (out / "prune_reports.json").write_text(json.dumps(reports, indent=1))
    return reports


def load(path: Path) -> torch.nn.Module:
    m, _ = benchlib.load_pretrained(path, tokenizer=False)
    if next(m.parameters()).dtype != torch.float32:
        raise ValueError(f"{path}: expected fp32 weights")
    m.shear_remote_code = benchlib.shear_modeling_file(str(path))
    return m


def cost(model, prefill: int) -> dict:
    """MACs of one prefill pass (LM head on the last position only) and weight bytes read per decode step."""
    from shear.eval.cost import attention_widths, linear_macs_per_token

    lin = linear_macs_per_token(model)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    body = sum(v for k, v in lin.items() if k != head)
    attn = sum(dq + dv for _, dq, dv in attention_widths(model)) * prefill * (prefill + 1) / 2
    emb = model.get_input_embeddings().weight
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    return {"prefill_macs": body * prefill + lin[head] + attn, "prefill_attn_macs": attn, "decode_bytes": nbytes,
            "params": sum(p.numel() for p in model.parameters()), "lm_head_bytes": lin[head] * 4}


def clocks() -> tuple[float, float]:
    """(wall, CPU time of this process). With 1 torch thread the CPU clock leaves out the time the
    scheduler gives to other jobs on shared cores; on an idle core the two agree."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float], n: int = 1) -> tuple[float, float]:
    t1 = clocks()
    return (t1[0] - t0[0]) / n, (t1[1] - t0[1]) / n


@torch.inference_mode()
def time_prefill(model, ids) -> tuple[float, float]:
    """(wall s, CPU s) of one prefill pass."""
    t0 = clocks()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return since(t0)


@torch.inference_mode()
def time_decode(model, ids, steps: int) -> tuple[float, float]:
    """(wall s, CPU s) per greedy step with the KV cache (the prompt's prefill is not timed)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = clocks()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return since(t0, steps)


def measure(model, a) -> dict:
    """Rates by the CPU clock: prefill tokens/s (batch 1), decode tokens/s at batch 1 and 8; ``*_wall``: by the wall clock."""
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(0, a.vocab, (1, a.prefill), generator=g)
    p1 = torch.randint(0, a.vocab, (1, a.prompt), generator=g)
    p8 = torch.randint(0, a.vocab, (8, a.prompt), generator=g)
    out = {}
    for k, tokens, (wall, cpu) in (("prefill", a.prefill, time_prefill(model, pre)),
                                   ("decode_b1", 1, time_decode(model, p1, a.decode)),
                                   ("decode_b8", 8, time_decode(model, p8, a.decode))):
        out[k], out[k + "_wall"] = tokens / cpu, tokens / wall
    return out


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def time_group(dense, models: dict, a) -> tuple[dict, list]:
    """Chains D P P D P P D (rotated); returns ({name: {metric: [speedup per rep]}}, raw rates)."""
    names = list(models)
    speed = {n: {k: [] for k in METRICS + tuple(m + "_wall" for m in METRICS)} for n in names}
    raw = []
    for rep in range(a.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        chunks = [order[i:i + 2] for i in range(0, len(order), 2)]
        d_prev = measure(dense, a)
        raw.append({"rep": rep, "model": "dense", **d_prev, "load": loadavg()})
        for chunk in chunks:
            got = {n: measure(models[n], a) for n in chunk}
            d_next = measure(dense, a)
            for n, r in got.items():
                raw.append({"rep": rep, "model": n, **r, "load": loadavg()})
                for k in speed[n]:
                    speed[n][k].append(r[k] / ((d_prev[k] + d_next[k]) / 2))
            raw.append({"rep": rep, "model": "dense", **d_next, "load": loadavg()})
            d_prev = d_next
        print(f"  rep {rep}: " + ", ".join(f"{n} {speed[n]['prefill'][-1]:.2f}/{speed[n]['decode_b1'][-1]:.2f}/"
                                           f"{speed[n]['decode_b8'][-1]:.2f}" for n in names), flush=True)
    return speed, raw


def run(a, out: Path) -> dict:
    t_start = time.time()
    saved = out / "prune_reports.json"
    reports = json.loads(saved.read_text()) if a.reuse and saved.exists() else prune_all(a, out)
    t_prune = time.time() - t_start
    dense = load(out / "dense")
    costs = {"dense": cost(dense, a.prefill)}
    warm = measure(dense, a)  # first-call effects out of the way
    rows, raw = [], []
    for ratio in a.ratios:
        names = [variant_name(al, ratio, rt) for al in ALLOCS for rt in a.round_to]
        models = {n: load(out / n) for n in names}
        for n, m in models.items():
            costs[n] = cost(m, a.prefill)
            measure(m, a)
        print(f"ratio {ratio}: timing {names} (load {loadavg():.1f})", flush=True)
        speed, r = time_group(dense, models, a)
        raw += r
        for n in names:
            c, d = costs[n], costs["dense"]
            ideal = {"prefill": d["prefill_macs"] / c["prefill_macs"], "decode_b1": d["decode_bytes"] / c["decode_bytes"]}
            ideal["decode_b8"] = ideal["decode_b1"]
            rows.append({"model": n, "removed": reports[n]["removed_ratio"], "remote_code": models[n].shear_remote_code,
                         "widths": reports[n]["widths_after"], "ideal": ideal,
                         "speedup": {k: statistics.median(v) for k, v in speed[n].items()}, "per_rep": speed[n]})
        del models
    return {"args": vars(a), "rows": rows, "costs": costs, "raw": raw, "warmup_dense": warm, "threads": torch.get_num_threads(),
            "machine": benchlib.machine(), "prune_export_s": round(t_prune, 1), "total_s": round(time.time() - t_start, 1)}


def table(res: dict, clock: str = "") -> str:
    """Markdown table; ``clock="_wall"`` gives the wall-clock speedups of the same run."""
    cells = []
    for r in res["rows"]:
        c = {"model": r["model"], "removed": r["removed"], "loads": "trust_remote_code" if r["remote_code"] else "plain"}
        for k in METRICS:
            s, i = r["speedup"][k + clock], r["ideal"][k]
            bold = "**" if s / i < 0.9 else ""
            c[k] = f"{s:.2f}x / {i:.2f}x / {bold}{s / i:.2f}{bold}"
        cells.append(c)
    return benchlib.table(cells, [("model", "model"), ("removed", "removed", ".1%"), ("loads", "loads with"),
                                  ("prefill", f"prefill {res['args']['prefill']}: speedup / ideal (MACs) / achieved"),
                                  ("decode_b1", "decode b1: speedup / ideal (bytes) / achieved"),
                                  ("decode_b8", "decode b8: speedup / ideal (bytes) / achieved")], align="lr")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    w = 0.27
    for j, (k, c) in enumerate((("prefill", "#3b6ea8"), ("decode_b1", "#d08c2e"), ("decode_b8", "#5a9e5a"))):
        ax.bar([i + (j - 1) * w for i in range(len(rows))], [r["speedup"][k] / r["ideal"][k] for r in rows], w,
               color=c, label=k.replace("_", " "))
    ax.axhline(0.9, color="k", ls="--", lw=1)
    ax.axhline(1.0, color="#888", lw=0.6)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.5, 1.2)
    ax.set_ylabel("achieved / ideal speedup")
    ax.set_title(f"{res['costs']['dense']['params'] / 1e6:.0f}M-param random Llama, fp32, 1 CPU thread (CPU clock): "
                 "pruned vs dense, dashed = 0.9 target")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    """The settings of a run (``--explain``'s too: ``bench_speed_300m_explain.py`` reads the same flags)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-speed-300m"))
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--round-to", type=int, nargs="+", default=list(ROUNDS), help="prune.round_to values to compare")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens before the timed decode steps")
    ap.add_argument("--decode", type=int, default=8, help="timed decode steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="time the exports an earlier --keep-models run left in --out")
    ap.add_argument("--keep-models", action="store_true", help="keep the exported weights (~11 GB) after timing")
    ap.add_argument("--explain-ratio", type=float, default=0.5, help="--explain: ratio of the models broken down")
    ap.add_argument("--explain", action="store_true", help="run the measurements of what eats the difference "
                                                           "(needs the main run's results.json in --out)")
    for k, v in (("hidden", 1024), ("layers", 24), ("heads", 16), ("kv_heads", 8), ("intermediate", 2816), ("vocab", 32000)):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if a.explain:  # the explaining script imports this one (its settings, models and clocks), so it runs on its own
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("bench_speed_300m_explain.py")),
                                  *(sys.argv[1:] if argv is None else argv)])
    res = run(a, a.out)
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "table.md").write_text(table(res) + "\n")
    plot(res, a.out / "speed_300m.png")
    print(table(res))
    print("\nwall clock, same run:\n" + table(res, "_wall"))
    print(f"total {res['total_s']:.0f} s (prune+export {res['prune_export_s']:.0f} s)")
    if not a.keep_models:  # only the model directories this script wrote, never anything else in --out
        for name in ["dense"] + [variant_name(al, r, rt) for r in a.ratios for al in ALLOCS for rt in a.round_to]:
            if (a.out / name / "config.json").exists():
                shutil.rmtree(a.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
