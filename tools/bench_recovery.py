"""Recovery benchmark: prune the reference teacher once, recover it several ways at one token budget.

    OMP_NUM_THREADS=1 python tools/bench_recovery.py --model reference-teacher --ratio 0.5 --steps 800 --out runs/bench-recovery-teacher

Variants (each from the same pruned weights, same data order, same steps x batch x seq_len tokens):
CE only, KD only, CE+KD (full fine-tuning), CE+KD with LoRA, CE with LoRA; then a plain
transformers `Trainer` + peft LoRA loop doing the CE-LoRA work on the same blocks, for throughput.
Control: the DENSE teacher trained on the same extra tokens with the same recipe, CE only. A student
is judged against it ("x control"), not only against the teacher as it was: extra tokens alone may
improve an undertrained teacher, and then "recovers to 0.98x dense" says nothing about KD.
Held-out PPL: shear's perplexity (eval_text) on the held-out split, seq 128, stride 128.
Prints a markdown table and writes it to OUT/table.md (rows also in OUT/rows.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def hf_trainer_lora(model, train_ds, a, out: Path) -> float:
    """tokens/s of transformers.Trainer + peft LoRA on the same blocks, steps and batch (CE)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    args = TrainingArguments(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.steps // 10,
                             logging_steps=max(1, a.steps // 5), save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
                             disable_tqdm=True)
    runtime = Trainer(model=peft_model, args=args, train_dataset=train_ds).train().metrics["train_runtime"]
    return a.steps * a.batch_size * a.seq_len / runtime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference-teacher", help="dense teacher: a shear.models name or a directory")
    ap.add_argument("--data", default="shakespeare", help="data.source of shear's data layer")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of parameters pruned")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--ppl-windows", type=int, default=0, help="held-out windows scored (0 = the whole split)")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches of the trainer's own log")
    ap.add_argument("--variants", default="control,ce,kd,ce+kd,ce+kd-lora,ce-lora,hf-trainer-lora")
    ap.add_argument("--out", default="runs/bench-recovery")
    a = ap.parse_args(argv)

    from shear.data.text import DataConfig, build_datasets
    from shear.eval.perplexity import eval_text, load_eval_text
    from shear.models import load_model, load_tokenizer
    from shear.prune.config import PruneConfig
    from shear.prune.pipeline import run_prune
    from shear.train.config import DistillConfig, LoraConfig, TrainConfig
    from shear.train.trainer import train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(a.model)
    dense = load_model(a.model)
    train_ds, val_ds = build_datasets(DataConfig(source=a.data, seq_len=a.seq_len), tok)
    held_out = load_eval_text(a.data, "validation")
    protocol = {}

    def ppl(m) -> float:
        r = eval_text(m.eval(), tok, held_out, a.seq_len, a.seq_len, batch_size=8, max_windows=a.ppl_windows or None)
        protocol.update(r.protocol)
        return r.ppl

    rows = [("dense teacher", None, ppl(dense), None)]
    pruned, _, report = run_prune(copy.deepcopy(dense), tok, PruneConfig(target={"ratio": a.ratio}))
    rows.append((f"pruned {a.ratio:.0%}, no recovery", None, ppl(pruned), None))
    specs = {
        "ce": (DistillConfig(ce_weight=1.0, kd_weight=0.0), None),
        "kd": (DistillConfig(ce_weight=0.0, kd_weight=1.0), None),
        "ce+kd": (DistillConfig(ce_weight=0.5, kd_weight=0.5), None),
        "ce+kd-lora": (DistillConfig(ce_weight=0.5, kd_weight=0.5), LoraConfig(r=a.lora_r, alpha=2 * a.lora_r)),
        "ce-lora": (None, LoraConfig(r=a.lora_r, alpha=2 * a.lora_r)),
    }
    train_cfg = lambda lr, lora: TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=lr, warmup_steps=a.steps // 10,
                                             lora=lora, log_every=max(1, a.steps // 10), resume=False,
                                             eval_batches=a.eval_batches)
    for name in a.variants.split(","):
        if name == "control":  # the dense teacher on the same extra tokens, same recipe, CE only
            res = train(copy.deepcopy(dense), train_ds, val_ds, train_cfg(a.lr, None), out / name)
            rows.append(("control: dense teacher + same tokens, CE", "full", ppl(res.model), res.metrics["tokens_per_s"]))
            continue
        if name == "hf-trainer-lora":
            tps = hf_trainer_lora(copy.deepcopy(pruned), train_ds, a, out / name)
            rows.append(("HF Trainer + peft LoRA, CE (throughput reference)", "lora", None, tps))
            continue
        distill, lora = specs[name]
        res = train(copy.deepcopy(pruned), train_ds, val_ds, train_cfg(a.lora_lr if lora else a.lr, lora), out / name,
                    teacher=dense if distill else None,
                    distill=distill if distill and distill.kd_weight > 0 else None)
        rows.append((f"shear {name}", "lora" if lora else "full", ppl(res.model), res.metrics["tokens_per_s"]))

    dense_ppl = rows[0][2]
    control = next((p for n, _, p, _ in rows if n.startswith("control")), None)
    keys = ("seq_len", "stride", "windows", "tokens_scored")
    lines = [f"machine: {benchlib.machine_line()}",
             f"held-out PPL: {a.data} validation, " + ", ".join(f"{k}={protocol[k]}" for k in keys if k in protocol),
             f"tokens per variant: {a.steps * a.batch_size * a.seq_len:,} ({a.steps} steps x {a.batch_size} x "
             f"{a.seq_len}); params {report.get('params_before')} -> {report.get('params_after')}", ""]
    cells = [{"run": name, "mode": mode or "-", "ppl": p, "x": p and p / dense_ppl, "xc": p and control and p / control,
              "tps": tps} for name, mode, p, tps in rows]
    lines.append(benchlib.table(cells, [("run", "run"), ("mode", "weights"), ("ppl", "held-out PPL", ".2f"),
                                        ("x", "x dense", ".3f"), ("xc", "x control", ".3f"), ("tps", "tokens/s", ".0f")],
                                align="llrrrr", missing="-"))
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
