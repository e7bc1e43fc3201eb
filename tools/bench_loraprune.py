"""LoRAPrune vs FLAP as the criterion of prune-while-tuning, same parameter budget, same tuning.

    OMP_NUM_THREADS=1 SHEAR_CACHE=~/.cache/shear python tools/bench_loraprune.py --out runs/bench-loraprune

Model: ``reference-quick`` (build it once with ``shear quickstart`` or
``shear run recipes/reference/quick.yaml``; SHEAR_CACHE picks the cache). Both criteria run
``shear.train.iterative.prune_while_tuning`` with the same target (``--ratio`` of parameters, heads
+ MLP, ``--allocation``), the same ``--rounds`` rounds, the same LoRA tuning (r, alpha, lr, steps,
batch, data seeds) and the same loss (CE + KD from the dense model, 0.5 / 0.5); only
``importance.estimator`` differs (``--allocation uniform`` keeps every layer's width equal, as
the LoRAPrune reference prunes each layer by the same ratio):

- flap: each round rescored by FLAP on calibration text (activation variance x weight norm,
  standardized, bias compensation), then LoRA-tuned, merged;
- loraprune: each round planned from the LoRA factor gradients gathered while tuning the previous
  round (round 1 from a calibration pass through fresh adapters).

Held-out PPL: ``shear.eval.perplexity.eval_text`` on the validation split (seq_len 128, stride 128,
``--max-windows`` windows). Each criterion runs once per ``--seeds`` entry (the data order of
tuning); the table shows every run and the mean. Prints a markdown block (command, machine,
table) and writes it to OUT/table.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference-quick")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of parameters removed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="tuning steps in all rounds together")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--allocation", default="global", choices=["global", "uniform"],
                    help="global: units ranked across layers (shear's default); uniform: the same width in every "
                         "layer (the LoRAPrune reference prunes each layer by the same ratio)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--criteria", default="flap,loraprune")
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--out", default="runs/bench-loraprune")
    a = ap.parse_args(argv)

    import torch

    from shear.data.text import DataConfig, build_datasets
    from shear.eval.perplexity import eval_text, load_eval_text
    from shear.models import load_model, load_tokenizer
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.train.config import DistillConfig, LoraConfig, TrainConfig
    from shear.train.iterative import prune_while_tuning

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, dense = load_tokenizer(a.model), load_model(a.model)
    train_ds, val_ds = build_datasets(DataConfig(source=a.data, seq_len=a.seq_len), tok)
    text = load_eval_text(a.data, "validation")
    ppl = lambda m: eval_text(m.eval(), tok, text, seq_len=a.seq_len, max_windows=a.max_windows).ppl
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    distill = DistillConfig(ce_weight=0.5, kd_weight=0.5)
    pcfg = PruneConfig(target={"ratio": a.ratio}, structures=["heads", "mlp"], allocation=a.allocation)
    lora = LoraConfig(r=a.lora_r, alpha=a.lora_alpha)
    teacher = copy.deepcopy(dense).eval()
    dense_ppl = ppl(dense)
    rows = []
    for crit in a.criteria.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            icfg = ImportanceConfig(estimator=crit, seed=seed)
            tcfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.steps // 10,
                               log_every=max(1, a.steps // 10), resume=False, eval_batches=8, seed=seed, lora=lora)
            torch.manual_seed(seed)
            t0 = time.time()
            m, rep = prune_while_tuning(copy.deepcopy(dense), tok, pcfg, icfg, tcfg, train_ds, val_ds,
                                        out / f"{crit}-seed{seed}", rounds=a.rounds, teacher=teacher, distill=distill)
            row = {"criterion": crit, "seed": seed, "params": n_params(m), "target": rep["target_params"],
                   "steps": rep["total_steps"], "ppl": ppl(m), "wall_s": round(time.time() - t0, 1),
                   "round_val_ppl": [r["val_ppl"] for r in rep["rounds"]]}
            rows.append(row)
            print(row, flush=True)

    cmd = " ".join(shlex.quote(x) for x in [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
                                            "python", "tools/bench_loraprune.py", *(argv or sys.argv[1:])])
    lines = [f"    {cmd}", "",
             f"Machine: {benchlib.machine_line()}.", "",
             f"{a.model} ({n_params(dense):,} params, held-out PPL {dense_ppl:.2f}), {a.ratio:.0%} of parameters "
             f"removed (heads + MLP, {a.allocation} allocation), prune-while-tuning in {a.rounds} rounds, {a.steps} LoRA steps in all "
             f"(r {a.lora_r}, alpha {a.lora_alpha:g}, lr {a.lr}) x {a.batch_size} x {a.seq_len} tokens, CE+KD 0.5/0.5 "
             f"from the dense model. Held-out PPL = eval_text(validation, seq_len {a.seq_len}, "
             f"max_windows {a.max_windows}); per-round PPL = the trainer's validation PPL after each round.", ""]
    cells = [{**r, "params": f"{r['params']:,} ({r['target']:,})", "x": r["ppl"] / dense_ppl,
              "rounds": " / ".join(f"{v:.1f}" for v in r["round_val_ppl"])} for r in rows]
    for crit in a.criteria.split(","):
        ps = [r["ppl"] for r in rows if r["criterion"] == crit]
        mean = sum(ps) / len(ps)
        cells.append({"criterion": f"**{crit} mean**", "ppl": f"**{mean:.2f}**", "x": mean / dense_ppl})
    lines.append(benchlib.table(cells, [("criterion", "criterion"), ("seed", "seed", ""), ("params", "params (target)"),
                                        ("steps", "steps", ""), ("ppl", "held-out PPL", ".2f"), ("x", "x dense", ".2f"),
                                        ("rounds", "per-round PPL"), ("wall_s", "wall s", "")], align="lrrrrrlr"))
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
