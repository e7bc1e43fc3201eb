"""Recovery benchmark: prune the reference model once, recover it several ways at one token budget.

    python tools/bench_recovery.py --model reference --ratio 0.5 --steps 300 --out runs/bench-recovery

Variants (each from the same pruned weights, same data order, same steps x batch x seq_len tokens):
CE only, KD only, CE+KD (full fine-tuning), CE+KD with LoRA, CE with LoRA; then a plain
transformers `Trainer` + peft LoRA loop doing the CE-LoRA work on the same blocks, for throughput.
Prints a markdown table (held-out PPL after recovery, tokens/s) and writes it to OUT/table.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch


@torch.no_grad()
def val_ppl(model, ds, batch_size: int = 8, max_batches: int | None = None) -> float:
    """exp(mean NLL) over the scored tokens of `ds` (items {"input_ids", "labels"} of one length)."""
    from shear.train.data import collate

    model.eval()
    nll, count, n = 0.0, 0, len(ds)
    stops = range(0, n, batch_size)
    for b, start in enumerate(stops):
        if max_batches and b >= max_batches:
            break
        batch = collate(ds, list(range(start, min(n, start + batch_size))))
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1].float()
        tgt = batch["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                                 reduction="sum").item()
        count += int((tgt != -100).sum())
    return math.exp(nll / max(count, 1))


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
    ap.add_argument("--model", default="reference", help="dense model: 'reference' (cache) or a directory")
    ap.add_argument("--data", default="shakespeare", help="data.source of shear's data layer")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of parameters pruned")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation split")
    ap.add_argument("--variants", default="ce,kd,ce+kd,ce+kd-lora,ce-lora,hf-trainer-lora")
    ap.add_argument("--out", default="runs/bench-recovery")
    a = ap.parse_args(argv)

    from shear.data.text import DataConfig, build_datasets
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
    ppl = lambda m: val_ppl(m, val_ds, a.batch_size, a.eval_batches or None)
    rows = [("dense", None, ppl(dense), None)]
    pruned, _, report = run_prune(copy.deepcopy(dense), tok, PruneConfig(target={"ratio": a.ratio}))
    rows.append((f"pruned {a.ratio:.0%}, no recovery", None, ppl(pruned), None))
    specs = {
        "ce": (DistillConfig(ce_weight=1.0, kd_weight=0.0), None),
        "kd": (DistillConfig(ce_weight=0.0, kd_weight=1.0), None),
        "ce+kd": (DistillConfig(ce_weight=0.5, kd_weight=0.5), None),
        "ce+kd-lora": (DistillConfig(ce_weight=0.5, kd_weight=0.5), LoraConfig(r=a.lora_r, alpha=2 * a.lora_r)),
        "ce-lora": (None, LoraConfig(r=a.lora_r, alpha=2 * a.lora_r)),
    }
    for name in a.variants.split(","):
        if name == "hf-trainer-lora":
            tps = hf_trainer_lora(copy.deepcopy(pruned), train_ds, a, out / name)
            rows.append(("HF Trainer + peft LoRA, CE (throughput reference)", "lora", None, tps))
            continue
        distill, lora = specs[name]
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lora_lr if lora else a.lr,
                          warmup_steps=a.steps // 10, lora=lora, log_every=max(1, a.steps // 10), resume=False,
                          eval_batches=a.eval_batches)
        res = train(copy.deepcopy(pruned), train_ds, val_ds, cfg, out / name,
                    teacher=dense if distill else None,
                    distill=distill if distill and distill.kd_weight > 0 else None)
        rows.append((f"shear {name}", "lora" if lora else "full", ppl(res.model), res.metrics["tokens_per_s"]))

    dense_ppl = rows[0][2]
    lines = [f"tokens per variant: {a.steps * a.batch_size * a.seq_len:,} ({a.steps} steps x {a.batch_size} x "
             f"{a.seq_len}); params {report.get('params_before')} -> {report.get('params_after')}", "",
             "| run | weights | val PPL | x dense | tokens/s |", "|---|---|---:|---:|---:|"]
    for name, mode, p, tps in rows:
        cells = [name, mode or "-", f"{p:.2f}" if p else "-", f"{p / dense_ppl:.2f}" if p else "-",
                 f"{tps:.0f}" if tps else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
