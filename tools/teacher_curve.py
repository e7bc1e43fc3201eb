"""Held-out PPL curve of a pretraining run: every checkpoint scored on the whole validation split.

    OMP_NUM_THREADS=1 python tools/teacher_curve.py runs/reference-teacher --out docs/teacher_curve

RUN is the output directory of `shear run` on a pretraining recipe (init: scratch) whose
checkpoints were all kept (recipes/reference/pretrain-teacher.yaml). Each checkpoint's weights go
into the recipe's architecture and are scored with shear's perplexity (eval_text: the split as one
stream, seq 128, stride 128, every window). Convergence check: for every checkpoint at T tokens with
one at 1.5 T, the relative PPL gain PPL(T) / PPL(1.5 T) - 1. Under a cosine schedule the later point
also gets the lr decay, so the gain read here overstates what more tokens at a fixed schedule would buy.
With --export DIR the exported (e.g. fp16) model is scored too, loaded in fp32 as benchmarks load it.
Writes OUT.json, OUT.md (table) and OUT.png (plot).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a trainer checkpoint (its names carry the loss module's ``model.`` prefix)."""
    from safetensors.torch import load_file

    w = load_file(str(path / "trainable.safetensors"))
    return {k.removeprefix("model."): v for k, v in w.items()}


def convergence(points: list[dict]) -> list[dict]:
    """Pairs (T, 1.5 T) among the points: ``{tokens, tokens_1_5, ppl, ppl_1_5, gain}``, gain = PPL(T)/PPL(1.5T) - 1."""
    by_tokens = {p["tokens"]: p["ppl"] for p in points}
    return [{"tokens": t, "tokens_1_5": t * 3 // 2, "ppl": p, "ppl_1_5": by_tokens[t * 3 // 2],
             "gain": p / by_tokens[t * 3 // 2] - 1} for t, p in by_tokens.items() if t % 2 == 0 and t * 3 // 2 in by_tokens]


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot([p["tokens"] / 1e6 for p in points], [p["ppl"] for p in points], "o-", ms=3)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out PPL (seq 128, stride 128)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="output directory of the pretraining run")
    ap.add_argument("--out", default="docs/teacher_curve", help="output prefix: OUT.json, OUT.md, OUT.png")
    ap.add_argument("--export", default=None, help="also score this exported model directory (loaded in fp32)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = every window of the split")
    a = ap.parse_args(argv)

    import yaml

    from shear.config import validate_recipe
    from shear.eval.perplexity import eval_text, load_eval_text
    from shear.pipeline import build_model
    from shear.train.checkpoint import list_checkpoints

    run = Path(a.run)
    recipe = validate_recipe(yaml.safe_load((run / "recipe.yaml").read_text()))
    if recipe.model.init != "scratch":
        raise SystemExit(f"{run}: not a pretraining run (model.init is {recipe.model.init!r})")
    recipe.model.tokenizer = str(run / "train" / "tokenizer")  # the BPE the run trained, not a new one
    model, tok = build_model(recipe)
    model.eval()
    text = load_eval_text("shakespeare" if recipe.data.source == "shakespeare" else recipe.eval.dataset)
    tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * recipe.data.seq_len
    score = lambda m: eval_text(m, tok, text, a.seq_len, a.seq_len, batch_size=8, max_windows=a.max_windows or None)

    points, proto = [], None
    for step, path in list_checkpoints(run / "train" / "checkpoints"):
        model.load_state_dict(checkpoint_weights(path), strict=True)
        r = score(model)
        proto = r.protocol_line()
        points.append({"step": step, "tokens": step * tokens_per_step, "ppl": r.ppl})
        print(f"step {step:6d}  tokens {step * tokens_per_step:>11,}  PPL {r.ppl:.2f}", flush=True)
    if not points:
        raise SystemExit(f"{run}: no checkpoints")
    result = {"run": str(run), "protocol": proto, "tokens_per_step": tokens_per_step, "points": points,
              "convergence": convergence(points)}
    if a.export:
        from shear.models import load_model, load_tokenizer

        r = eval_text(load_model(a.export, "fp32"), load_tokenizer(a.export), text, a.seq_len, a.seq_len,
                      batch_size=8, max_windows=a.max_windows or None)
        result["export"] = {"dir": a.export, "ppl": r.ppl}

    n_train = None
    try:
        from shear.data.text import build_datasets

        n_train = len(build_datasets(recipe.data, tok)[0]) * recipe.data.seq_len
    except Exception:  # noqa: BLE001 - the epoch column is a convenience
        pass
    cells = [{**p, "epochs": f"{p['tokens'] / n_train:.2f}" if n_train else "-"} for p in points]
    lines = [f"Protocol: shakespeare validation, {proto}", "",
             benchlib.table(cells, [("step", "step", ""), ("tokens", "tokens", ","), ("epochs", "epochs"),
                                    ("ppl", "held-out PPL", ".2f")], align="rrrr"), "",
             benchlib.table(result["convergence"], [("tokens", "T tokens", ","), ("tokens_1_5", "1.5 T tokens", ","),
                                                    ("ppl", "PPL(T)", ".2f"), ("ppl_1_5", "PPL(1.5 T)", ".2f"),
                                                    ("gain", "gain from +50% tokens", ".1%")], align="rrrrr")]
    if "export" in result:
        lines += ["", f"Exported model ({a.export}, loaded in fp32): PPL {result['export']['ppl']:.2f}"]
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    plot(points, out.with_suffix(".png"), f"{run.name}: held-out PPL vs training tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
