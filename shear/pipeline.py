"""``shear run RECIPE``: the stages a recipe names, in order, with their outputs in one directory.

model -> (prune: analyze, score, plan, slice | sparsify: zero single weights) -> (train: recovery, with KD
when distill is set; sparsify's zeros are kept) -> export (with sparsify: also OUTPUT_DIR/compressed)
-> eval. The resolved recipe is written first, so a run that fails still says what it was;
a directory belongs to one recipe (shear/rundir.py).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from shear.config import Recipe
from shear.rundir import OnChange, open_run_dir

log = logging.getLogger("shear")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe, train_texts=None):
    """(model, tokenizer) for the recipe's model section: loaded, or built new for pretraining."""
    from shear.models import load_model, load_tokenizer, reference_config

    m = recipe.model
    if m.init == "pretrained":
        model = load_model(m.path, m.dtype, trust_remote_code=m.trust_remote_code, device_map=m.device_map)
        return model, load_tokenizer(m.tokenizer or m.path)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if m.tokenizer:
        tok = AutoTokenizer.from_pretrained(m.tokenizer)
    else:
        from shear.data.text import load_text_splits
        from shear.data.tokenizer import train_bpe

        texts = load_text_splits(recipe.data)["train"][recipe.data.text_field]
        tok = train_bpe(list(texts), m.tokenizer_vocab)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if isinstance(m.arch, str):
        cfg = reference_config(m.arch, **ids)
    elif isinstance(m.arch, dict):
        cfg = LlamaConfig(**{**m.arch, **ids})
    else:
        raise ValueError("recipe.model.arch: init=scratch needs an architecture (a reference name or config keys)")
    seed_everything(recipe.seed)
    return LlamaForCausalLM(cfg), tok


def check_lengths(recipe: Recipe, model) -> None:
    """Every window the recipe will run through the model fits its positions (before any work)."""
    from shear.eval.report import check_context

    if recipe.train is not None:
        check_context(model, recipe.data.seq_len, "data.seq_len")
    if recipe.prune is not None and recipe.importance is not None:
        check_context(model, recipe.importance.seq_len, "importance.seq_len")
    if recipe.sparsify is not None and recipe.sparsify.seq_len is not None:
        check_context(model, recipe.sparsify.seq_len, "sparsify.seq_len")
    if recipe.eval is not None and recipe.eval.perplexity:
        check_context(model, recipe.eval.seq_len, "eval.seq_len")


def resolve_teacher(recipe: Recipe, model):
    """The KD teacher: distill.teacher when named, else a frozen copy of the model before pruning."""
    d = recipe.distill  # the recipe validator guarantees a train section and a teacher source
    if d is None:
        return None
    if d.teacher is not None:
        from shear.models import load_model

        return load_model(d.teacher, d.teacher_dtype, trust_remote_code=recipe.model.trust_remote_code)
    return copy.deepcopy(model).eval()


def is_main_process() -> bool:
    """Rank 0 (or a single process): under `accelerate launch` only it writes files and evaluates."""
    return os.environ.get("RANK", "0") == "0"


def run_recipe(recipe: Recipe, out_dir: str | Path | None = None, on_change: OnChange = "refuse") -> dict:
    """Run every stage the recipe names; return a summary (also written to OUTPUT_DIR/summary.json).

    A directory that holds a run of another recipe is refused, continued or restarted as
    ``on_change`` says (see shear/rundir.py). Under a multi-process launch every rank prunes
    (deterministically, the same plan) and trains; rank 0 alone writes the recipe, the prune report,
    the export, the evaluation and the summary.
    """
    main = is_main_process()
    out = Path(out_dir or recipe.output_dir)
    open_run_dir(recipe, out, on_change, write=main)
    seed_everything(recipe.seed)
    t0 = time.time()
    summary: dict = {"output_dir": str(out), "stages": []}

    model, tok = build_model(recipe)
    check_lengths(recipe, model)
    evals: dict = {}

    def evaluate_as(name: str) -> None:
        if recipe.eval is not None and main:
            from shear.eval.report import evaluate

            evals[name] = evaluate(model, tok, recipe.eval, name=f"{name} model ({recipe.model.path})")
            log.info("eval %s: %s", name, {k: v for k, v in evals[name].items() if not isinstance(v, dict)})

    teacher = resolve_teacher(recipe, model)
    if recipe.prune is not None:
        evaluate_as("original")
        from shear.prune.pipeline import run_prune

        if recipe.prune.tune_rounds > 1:  # prune while tuning: rounds of prune + train replace both stages
            from shear.train.iterative import run_rounds_from_recipe

            model, report = run_rounds_from_recipe(recipe, model, tok, teacher, out)
            summary["prune"], summary["train"] = report, {"final_val_ppl": report["final_val_ppl"]}
            summary["stages"] += ["prune", "train"]
        else:
            model, plan, report = run_prune(model, tok, recipe.prune, recipe.importance, out / "prune" if main else None,
                                            data=recipe.data)
            summary["prune"] = report
            summary["stages"].append("prune")
            if recipe.train is not None:
                evaluate_as("pruned")

    masks = None
    if recipe.sparsify is not None:
        from shear.sparse.pipeline import run_sparsify
        from shear.sparse.recovery import zero_masks

        evaluate_as("original")
        model, summary["sparsify"] = run_sparsify(model, tok, recipe.sparsify, out / "sparsify" if main else None,
                                                  data=recipe.data)
        summary["stages"].append("sparsify")
        masks = zero_masks(model, summary["sparsify"]["pruned"])  # training keeps these zeros
        if recipe.train is not None:
            evaluate_as("sparsified")

    if recipe.train is not None and "train" not in summary:
        from shear.data.text import build_datasets
        from shear.train.trainer import train

        train_ds, val_ds = build_datasets(recipe.data, tok)
        result = train(model, train_ds, val_ds, recipe.train, out / "train", teacher=teacher,
                       distill=recipe.distill, tokenizer=tok, masks=masks)
        model = result.model
        summary["train"] = result.metrics
        summary["stages"].append("train")
    del teacher

    if recipe.export is not None and main:
        from shear.prune.export import export

        if recipe.export.dtype:
            from shear.models import DTYPES

            # weights only: buffers such as RoPE's inv_freq stay fp32, as from_pretrained(dtype=...) leaves them,
            # so the model evaluated here is the model that reloads
            for p in model.parameters():
                p.data = p.data.to(DTYPES[recipe.export.dtype])
        from shear.models import cache_dir

        target = (Path(recipe.export.dir.replace("{cache}", str(cache_dir()))).expanduser()
                  if recipe.export.dir else out / "model")
        if recipe.sparsify is not None:  # the dense form, plus the compressed-tensors form and bytes on disk
            from shear.sparse.pipeline import export_sparse, write_report

            export_sparse(model, summary["sparsify"], recipe.sparsify, target,
                          out / "compressed" if recipe.sparsify.compressed else None, tokenizer=tok,
                          recipe=recipe.model_dump(mode="json"), overwrite=recipe.export.overwrite)
            write_report(summary["sparsify"], out / "sparsify")
        else:
            export(model, target, tokenizer=tok, recipe=recipe.model_dump(mode="json"), overwrite=recipe.export.overwrite)
        summary["model_dir"] = str(target)
        summary["stages"].append("export")

    evaluate_as("final")
    if evals:
        summary["eval"] = evals
        summary["stages"].append("eval")

    summary["wall_s"] = round(time.time() - t0, 1)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
