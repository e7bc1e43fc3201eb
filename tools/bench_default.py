"""The default's other half: candidate default plans on the toy teacher (reference-teacher, trained by shear on
Shakespeare), beside the real-model rows of tools/bench_real.py. A default must hold on both.

    OMP_NUM_THREADS=2 python tools/bench_default.py --out runs/bench-default

Same protocol as the toy tables in docs/BENCHMARKS.md: held-out Shakespeare (macbeth + tempest) as one
stream, non-overlapping 128-token windows, the first 200; calibration is what each plan's defaults
resolve to for this model (the text it was trained on: 32 x 128 Shakespeare tokens). No recovery.
Every row is exported and reloaded in a fresh process (``benchlib.load_pretrained``) before it is scored.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

CANDIDATES = [
    ("default", []),
    ("old default: flap, global, KV groups + MLP", ["--estimator", "flap", "--allocation", "global",
                                                     "--structures", "heads", "mlp", "--heads", "kv_group"]),
    ("flap, uniform, MLP", ["--estimator", "flap", "--allocation", "uniform", "--structures", "mlp"]),
    ("flap, uniform, query heads + MLP", ["--estimator", "flap", "--allocation", "uniform", "--structures", "heads",
                                          "mlp", "--heads", "query_head"]),
    ("obs, uniform, MLP", ["--estimator", "obs", "--allocation", "uniform", "--structures", "mlp"]),
    ("obs, uniform, query heads + MLP", ["--estimator", "obs", "--allocation", "uniform", "--structures", "heads",
                                         "mlp", "--heads", "query_head"]),
    ("flap_original, pool (AL-AM)", ["--estimator", "flap_original", "--allocation", "pool"]),
]

EVAL = """
import json, sys
sys.path.insert(0, sys.argv[2])
import benchlib
from shear.eval.perplexity import eval_text, load_eval_text
m, tok = benchlib.load_pretrained(sys.argv[1])  # shear's own per-layer modeling file only; every key loaded
r = eval_text(m, tok, load_eval_text("shakespeare", "validation"), seq_len=128, max_windows=200, batch_size=8)
print(json.dumps({"ppl": r.ppl, "params": sum(p.numel() for p in m.parameters())}))
"""


def fresh(model_dir: str) -> dict:
    """The toy protocol on ``model_dir`` reloaded in a fresh process (the directory alone, as a user gets it)."""
    return benchlib.fresh_json(["-c", EVAL, model_dir, str(Path(__file__).resolve().parent)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference-teacher")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--out", default="runs/bench-default")
    a = ap.parse_args(argv)
    from shear.models import resolve_model_path

    model = resolve_model_path(a.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = fresh(model)
    rows = [{"plan": "dense", "ratio": 0.0, **dense, "x": 1.0}]
    for r in a.ratios:
        for i, (name, flags) in enumerate(CANDIDATES):
            d = out / f"{i}-{int(r * 100)}"
            m = benchlib.measure(["shear", "prune", model, "--ratio", str(r), *flags, "-o", str(d)],
                                 log=Path(str(d) + ".log"))
            row = {"plan": name, "ratio": r, **m}
            if m["rc"] == 0:
                row.update(fresh(str(d / "model")))
                row["x"] = row["ppl"] / dense["ppl"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    table = benchlib.table(rows, [("plan", "plan"), ("ratio", "removed"), ("params", "params"), ("ppl", "PPL"),
                                  ("x", "x dense"), ("wall_s", "time s")])
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
