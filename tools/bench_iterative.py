"""One-shot vs prune-while-tuning at the same token budget, on the reference model.

    OMP_NUM_THREADS=2 python tools/bench_iterative.py --steps 150 --rounds 3 --out runs/bench-iterative

one-shot: prune to the target once (run_prune), then tune `steps` steps.
iterative: `rounds` rounds of (rescore, prune to the round's budget, tune steps/rounds steps).
Both: CE+KD from the dense model (ce 0.5, kd 0.5), full fine-tuning, same batch/seq_len/lr.
Held-out PPL: shear.eval.perplexity.eval_text on the validation text (seq_len 128, 100 windows).
Prints a markdown table and writes OUT/table.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--estimator", default="flap")
    ap.add_argument("--eval-batches", type=int, default=10, help="trainer's own val batches (per round)")
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--variants", default="one-shot,iterative")
    ap.add_argument("--out", default="runs/bench-iterative")
    a = ap.parse_args(argv)

    from shear.data.text import DataConfig, build_datasets
    from shear.eval.perplexity import eval_text, load_eval_text
    from shear.models import load_model, load_tokenizer
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune
    from shear.train.config import DistillConfig, TrainConfig
    from shear.train.iterative import prune_while_tuning
    from shear.train.trainer import train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, dense = load_tokenizer(a.model), load_model(a.model)
    train_ds, val_ds = build_datasets(DataConfig(source=a.data, seq_len=a.seq_len), tok)
    text = load_eval_text(a.data, "validation")
    ppl = lambda m: eval_text(m.eval(), tok, text, seq_len=a.seq_len, max_windows=a.max_windows).ppl
    distill = DistillConfig(ce_weight=0.5, kd_weight=0.5)
    pcfg, icfg = PruneConfig(target={"ratio": a.ratio}), ImportanceConfig(estimator=a.estimator)
    tcfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.steps // 10,
                       log_every=max(1, a.steps // 10), resume=False, eval_batches=a.eval_batches)
    teacher = copy.deepcopy(dense).eval()
    rows = [("dense", sum(p.numel() for p in dense.parameters()), 0, ppl(dense), None, "")]
    for name in a.variants.split(","):
        t0 = time.time()
        if name == "one-shot":
            m, _, rep = run_prune(copy.deepcopy(dense), tok, pcfg, icfg, out / name / "prune")
            pruned_ppl = ppl(m)
            res = train(m, train_ds, val_ds, tcfg, out / name / "train", teacher=teacher, distill=distill)
            m, steps, note = res.model, res.metrics["steps"], f"pruned, before tuning: {pruned_ppl:.2f}"
        else:
            m, rep = prune_while_tuning(copy.deepcopy(dense), tok, pcfg, icfg, tcfg, train_ds, val_ds,
                                        out / name, rounds=a.rounds, teacher=teacher, distill=distill)
            steps = rep["total_steps"]
            note = "; ".join(f"r{r['round']}: {r['params_after']:,} params, trainer val PPL {r['val_ppl']:.2f}"
                             for r in rep["rounds"])
        rows.append((name if name == "one-shot" else f"iterative K={a.rounds}", sum(p.numel() for p in m.parameters()),
                     steps, ppl(m), round(time.time() - t0, 1), note))
        print(rows[-1], flush=True)

    d = rows[0][3]
    lines = [f"reference model, {a.ratio:.0%} params pruned ({a.estimator}, heads+mlp, global), CE+KD (0.5/0.5) from "
             f"dense, {a.steps} steps x {a.batch_size} x {a.seq_len} tokens per variant, lr {a.lr}; held-out PPL "
             f"= eval_text(validation, seq_len {a.seq_len}, max_windows {a.max_windows})", ""]
    cells = [{"run": name, "params": n, "steps": steps, "ppl": p, "x": p / d, "wall": wall or "-", "note": note}
             for name, n, steps, p, wall, note in rows]
    lines.append(benchlib.table(cells, [("run", "run"), ("params", "params"), ("steps", "steps", ""),
                                        ("ppl", "held-out PPL", ".2f"), ("x", "x dense", ".2f"), ("wall", "wall s", ""),
                                        ("note", "notes")], align="lrrrrrl"))
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
