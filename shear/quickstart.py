"""``shear quickstart``: the whole path on a fresh install, offline, in minutes on two CPU cores.

1. build (or reuse from the cache) the quick reference model: a Llama with GQA pretrained on the
   embedded Shakespeare corpus (recipes/reference/quick.yaml is the same recipe);
2. prune it with shear's default estimator and recover it with distillation from the unpruned
   model, then export a directory that ``AutoModelForCausalLM.from_pretrained`` loads;
3. print params, PPL (with its protocol) and CPU latency before pruning, after, and after recovery.
"""
from __future__ import annotations

from pathlib import Path

from shear.config import merge, validate_recipe

# Same content as recipes/reference/quick.yaml (a test keeps the two equal).
QUICK_PRETRAIN = {
    "description": "Pretrain the quick reference model (Llama GQA, 1.3M params) for the quickstart",
    "output_dir": "runs/reference-quick",
    "seed": 0,
    "model": {"path": "reference-quick", "init": "scratch", "arch": "reference-quick", "tokenizer_vocab": 2048},
    "data": {"source": "shakespeare", "seq_len": 128},
    "train": {"steps": 1000, "batch_size": 8, "lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1,
              "precision": "fp32", "eval_every": 250, "eval_batches": 8, "save_every": 250, "log_every": 25},
    "export": {"dir": "{cache}/models/reference-quick"},
}

# Same content as recipes/reference/quick-prune-kd.yaml.
QUICK_PRUNE = {
    "description": "Quickstart: prune the quick reference model, recover it by KD, export, compare",
    "output_dir": "shear-quickstart",
    "seed": 0,
    "model": {"path": "reference-quick"},
    "data": {"source": "shakespeare", "seq_len": 128},
    "prune": {"target": {"ratio": 0.3}},
    "train": {"steps": 150, "batch_size": 8, "lr": 1e-3, "warmup_steps": 15, "precision": "fp32",
              "eval_every": 75, "eval_batches": 8, "save_every": 75, "log_every": 25},
    "distill": {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0},
    "export": {},
    "eval": {"seq_len": 128, "max_windows": 200},
}


def quickstart(out_dir: str = "shear-quickstart", rebuild: bool = False) -> dict:
    """Run the quickstart; return the prune/recover run's summary."""
    from rich.console import Console

    from shear.eval.report import compare_table
    from shear.models import cache_dir, needs_remote_code
    from shear.pipeline import run_recipe

    console = Console()
    out = Path(out_dir)
    ref = cache_dir() / "models" / "reference-quick"
    if rebuild or not (ref / "config.json").exists():
        console.print(f"[bold]1/2[/] building the quick reference model (once; cached in {ref}) ...")
        pretrain = merge(QUICK_PRETRAIN, {"export": {"overwrite": True}})  # --rebuild replaces the cached model
        run_recipe(validate_recipe(pretrain), out / "pretrain")
    else:
        console.print(f"[bold]1/2[/] reusing the quick reference model in {ref}")
    console.print("[bold]2/2[/] pruning, recovering with distillation, exporting, evaluating ...")
    summary = run_recipe(validate_recipe(merge(QUICK_PRUNE, {"output_dir": str(out), "export": {"overwrite": True}})), out)
    rows = {name: summary["eval"][key] for name, key in
            (("dense", "original"), ("pruned", "pruned"), ("recovered", "final")) if key in summary["eval"]}
    console.print(compare_table(rows))
    load = ("AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True): per-layer widths, "
            "its modeling file is in the directory" if needs_remote_code(summary["model_dir"])
            else "AutoModelForCausalLM.from_pretrained(dir): a stock architecture")
    console.print(f"exported model: [bold]{summary['model_dir']}[/] (loads with transformers' {load})")
    console.print(f"run outputs (recipe, prune report, training metrics, summary): {out}")
    return summary
