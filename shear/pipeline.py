"""``shear run RECIPE``: the stages a recipe names, in order, with their outputs in one directory.

model -> (prune: analyze, score, plan, slice; or learn masks in training, then slice | sparsify: zero single weights) -> (train: recovery, with KD
when distill is set; sparsify's zeros are kept) -> export (with sparsify: also OUTPUT_DIR/compressed)
-> eval. The resolved recipe is written first, so a run that fails still says what it was;
a directory belongs to one recipe (shear/rundir.py). A ``--resume`` over a changed recipe writes
nothing into the directory (recipe, run.json, stage reports) until training has restored its
checkpoint: a resume that fails leaves the directory describing what is in it.

Under a multi-process launch (``accelerate launch``) the process group starts first and lives for the
whole run. Calibration is split over the ranks and reduced (shear/distributed.py), so every rank
prunes to the same plan; the pruned or sparsified model is then broadcast from rank 0, so the ranks
train from identical weights. Rank 0 alone evaluates and exports; the others wait for its evaluations
at a barrier with a long timeout (an evaluation of hours does not time out the next collective).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from shear import distributed
from shear.config import Recipe
from shear.rundir import OnChange, locked, open_run_dir, record_run

log = logging.getLogger("shear")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe, train_texts=None):
    """(model, tokenizer) for the recipe's model section: loaded, or built new for pretraining."""
    from shear.models import load_pretrained, load_tokenizer, reference_config

    m = recipe.model
    if m.init == "pretrained":
        return load_pretrained(m.path, m.dtype, m.trust_remote_code, tokenizer=m.tokenizer, device_map=m.device_map,
                               finite=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    if m.tokenizer:
        tok = load_tokenizer(m.tokenizer, m.trust_remote_code)
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
    """Every window the recipe will run through the model fits its positions, and an eval section has a
    causal LM to measure (before any work)."""
    from shear.data.calibration import check_context
    from shear.eval.report import check_causal

    if recipe.train is not None:
        check_context(model, recipe.data.seq_len, "data.seq_len")
    if recipe.prune is not None and recipe.importance is not None and recipe.importance.seq_len is not None:
        check_context(model, recipe.importance.seq_len, "importance.seq_len")
    if recipe.sparsify is not None and recipe.sparsify.seq_len is not None:
        check_context(model, recipe.sparsify.seq_len, "sparsify.seq_len")
    if recipe.eval is not None and recipe.eval.perplexity:
        check_context(model, recipe.eval.seq_len, "eval.seq_len")
    if recipe.eval is not None:  # before the work, not at its end
        check_causal(model, recipe.eval, str(recipe.model.path))


def resolve_teacher(recipe: Recipe, model):
    """The KD teacher: distill.teacher when named, else a frozen copy of the model before pruning."""
    d = recipe.distill  # the recipe validator guarantees a train section and a teacher source
    if d is None:
        return None
    if d.teacher is not None:
        from shear.models import load_teacher

        return load_teacher(d.teacher, d.teacher_dtype, recipe.model.trust_remote_code, model)
    return copy.deepcopy(model).eval()


def is_main_process() -> bool:
    """Rank 0 (or a single process): under `accelerate launch` only it writes files and evaluates."""
    return os.environ.get("RANK", "0") == "0"


def run_recipe(recipe: Recipe, out_dir: str | Path | None = None, on_change: OnChange = "refuse") -> dict:
    """Run every stage the recipe names; return a summary (also written to OUTPUT_DIR/summary.json).

    A directory that holds a run of another recipe is refused, continued or restarted as
    ``on_change`` says (see shear/rundir.py). Under a multi-process launch every rank prunes (its
    share of the calibration, the same plan) and trains; rank 0 alone writes the recipe, the prune
    report, the export, the evaluation and the summary (module docstring).
    """
    from shear.train.accel import end_processes, init_processes

    run = _Run(recipe, Path(out_dir or recipe.output_dir))
    started = init_processes()  # before any model work: calibration and training share the group
    if started and run.main:
        log.info("%d processes: calibration is split over them; rank 0 evaluates and exports, the others wait",
                 distributed.world_size()[1])
    try:
        with locked(run.out) if run.main else contextlib.nullcontext():  # one command per directory
            changes = open_run_dir(recipe, run.out, on_change, write=run.main)
            run.pending = changes if run.main else {}
            try:
                return _run_stages(recipe, run)
            finally:
                run.discard_staged()
    finally:
        if started:
            end_processes()


def _run_stages(recipe: Recipe, run: _Run) -> dict:
    if recipe.export is not None and run.main:  # a finished run is not redone only to be refused at the export
        target = run.export_dir()
        if (target / "config.json").exists() and not recipe.export.overwrite:
            raise FileExistsError(f"{target} already holds a model (a finished run?): nothing redone; set "
                                  "export.overwrite=true to replace it, pass --restart, or write elsewhere (-o)")
    if run.main:  # what an interrupted export of an earlier run left behind
        from shear.prune.export import remove_stale_staging

        remove_stale_staging(run.out)
        remove_stale_staging(run.out / "sparsify")  # the report, staged beside it
        if recipe.export is not None and recipe.export.dir:
            remove_stale_staging(run.export_dir())
    if recipe.train is None or recipe.prune is not None and (recipe.prune.learn or recipe.prune.tune_rounds > 1):
        run.validated()  # no checkpoint is resumed before the stages write (or they resume it themselves)
    seed_everything(recipe.seed)
    t0 = time.time()
    model, tok = build_model(recipe)
    check_lengths(recipe, model)
    run.tok = tok
    teacher = resolve_teacher(recipe, model)
    if recipe.prune is not None:
        model = run.prune(model, teacher)
    masks = None
    if recipe.sparsify is not None:
        model, masks = run.sparsify(model)
    if recipe.train is not None and "train" not in run.summary:
        model = run.train(model, teacher, masks)
    del teacher
    run.validated()
    if recipe.export is not None and run.main:
        run.export(model)
    run.evaluate_as(model, "final")
    summary = run.summary
    if run.evals:
        summary["eval"] = run.evals
        summary["stages"].append("eval")
    summary["wall_s"] = round(time.time() - t0, 1)
    if run.main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


class _Run:
    """The stages of one recipe run, each a step that reads the recipe and adds to ``summary``."""

    def __init__(self, recipe: Recipe, out: Path):
        self.recipe, self.out, self.main = recipe, out, is_main_process()
        self.tok = None
        self._domains = None
        self.summary: dict = {"output_dir": str(out), "stages": []}
        self.evals: dict = {}
        self.pending: dict = {}  # the changes a --resume continues over, recorded once the resume is validated
        self._staged: dict[str, Path] = {}

    def report_dir(self, name: str) -> Path | None:
        """Where a stage writes its reports: OUT/NAME on rank 0; while a --resume is not validated yet, a staging
        directory beside it that :meth:`validated` moves in (a resume that fails leaves OUT/NAME as it was)."""
        if not self.main:
            return None
        if not self.pending:
            return self.out / name
        from shear.prune.export import staging_dir

        self._staged[name] = staging_dir(self.out / name)
        return self._staged[name]

    def validated(self) -> None:
        """The resume fits the changed recipe: record the change (recipe.yaml, run.json), move staged reports in."""
        if not self.pending:
            return
        from shear.prune.export import move_in

        for name, tmp in self._staged.items():
            if not tmp.is_dir():
                continue
            report = self.summary.get(name) or {}
            if "plot" in report:  # the report names its plot where it will be
                report["plot"] = str(self.out / name / Path(report["plot"]).name)
                (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
            staged = sorted(tmp.iterdir(), key=lambda f: f.name == "report.json")  # the report last
            move_in([], [(f, self.out / name / f.name) for f in staged])
        self.discard_staged()
        record_run(self.recipe, self.out, self.pending)
        self.pending = {}

    def discard_staged(self) -> None:
        import shutil

        for tmp in self._staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self._staged = {}

    def evaluate_as(self, model, name: str) -> None:
        """Rank 0 evaluates the model as it is now under ``name`` (when the recipe has an eval section); the
        other ranks wait for it."""
        if self.recipe.eval is None:
            return
        if self.main:
            from shear.eval.report import evaluate

            self.evals[name] = evaluate(model, self.tok, self.recipe.eval, name=f"{name} model ({self.recipe.model.path})")
            log.info("eval %s: %s", name, {k: v for k, v in self.evals[name].items() if not isinstance(v, dict)})
        distributed.wait_for_main()

    def prune(self, model, teacher):
        recipe, summary = self.recipe, self.summary
        self.evaluate_as(model, "original")
        if recipe.prune.tune_rounds > 1:  # prune while tuning: rounds of prune + train replace both stages
            from shear.train.iterative import run_rounds_from_recipe

            model, report = run_rounds_from_recipe(recipe, model, self.tok, teacher, self.out)
            summary["prune"], summary["train"] = report, {"final_val_ppl": report["final_val_ppl"]}
            summary["stages"] += ["prune", "train"]
            return model
        if recipe.prune.learn is not None:  # learned masks: a training stage of its own, then the finish
            return self.learn(model, teacher)
        from shear.prune.pipeline import prune_with_vocab

        model, self.tok, summary["prune"] = prune_with_vocab(model, self.tok, recipe.prune, recipe.importance,
                                                             self.report_dir("prune"),
                                                             data=recipe.data, teacher=teacher)
        distributed.broadcast_from_main_(model)  # the same weights on every rank (OBS refits ran on each)
        summary["stages"].append("prune")
        if recipe.train is not None:
            self.evaluate_as(model, "pruned")
        return model

    def datasets(self, teacher):
        """(train, validation, domain mix or None) of the recipe's data section."""
        from shear.data.text import build_datasets

        train_ds, val_ds = build_datasets(self.recipe.data, self.tok)
        domains = None
        if self.recipe.data.domains:  # dynamic batch loading: reference losses from the teacher unless given
            from shear.data.domains import mix_from_config

            if self._domains is None:  # measured once: the mask stage and recovery share it
                self._domains = mix_from_config(self.recipe.data, self.tok, teacher)
            domains = self._domains
        return train_ds, val_ds, domains

    def learn(self, model, teacher):
        from shear.shearing.learn import learn_masks

        recipe = self.recipe
        train_ds, val_ds, domains = self.datasets(teacher)
        model, self.summary["prune"] = learn_masks(
            model, recipe.prune, recipe.train, train_ds, val_ds, self.out / "learn", teacher=teacher,
            distill=recipe.distill, tokenizer=self.tok, domains=domains, report_dir=self.report_dir("prune"),
            importance=recipe.importance, data=recipe.data)
        self.summary["stages"].append("prune")
        self.evaluate_as(model, "pruned")
        return model

    def sparsify(self, model):
        from shear.sparse.pipeline import run_sparsify
        from shear.sparse.recovery import zero_masks

        self.evaluate_as(model, "original")
        model, self.summary["sparsify"] = run_sparsify(model, self.tok, self.recipe.sparsify,
                                                       self.report_dir("sparsify"), data=self.recipe.data)
        distributed.broadcast_from_main_(model)  # the same zeros on every rank (SparseGPT updates ran on each)
        self.summary["stages"].append("sparsify")
        masks = zero_masks(model, self.summary["sparsify"]["pruned"])  # training keeps these zeros
        if self.recipe.train is not None:
            self.evaluate_as(model, "sparsified")
        return model, masks

    def train(self, model, teacher, masks):
        from shear.train.trainer import train

        recipe = self.recipe
        train_ds, val_ds, domains = self.datasets(teacher)
        result = train(model, train_ds, val_ds, recipe.train, self.out / "train", teacher=teacher,
                       distill=recipe.distill, tokenizer=self.tok, masks=masks, domains=domains,
                       on_start=self.validated)
        self.summary["train"] = result.metrics
        self.summary["stages"].append("train")
        return result.model

    def export_dir(self) -> Path:
        from shear.models import cache_dir

        d = self.recipe.export.dir
        return Path(d.replace("{cache}", str(cache_dir()))).expanduser() if d else self.out / "model"

    def export(self, model) -> None:
        from shear.models import cast_weights_, export_dtype
        from shear.prune.export import export

        recipe, summary = self.recipe, self.summary
        dtype = recipe.export.dtype
        if dtype == "auto":
            dtype = export_dtype("auto", recipe.model.path if recipe.model.init == "pretrained" else None, model)
        # weights only: buffers such as RoPE's inv_freq stay fp32, as from_pretrained(dtype=...) leaves them,
        # so the model evaluated here is the model that reloads
        cast_weights_(model, dtype)
        shards = recipe.export.max_shard_size
        target = self.export_dir()
        as_json = recipe.model_dump(mode="json")
        if recipe.sparsify is not None:  # the dense form, plus the compressed-tensors form and bytes on disk
            from shear.sparse.pipeline import export_sparse

            export_sparse(model, summary["sparsify"], recipe.sparsify, target,
                          self.out / "compressed" if recipe.sparsify.compressed else None, tokenizer=self.tok,
                          recipe=as_json, overwrite=recipe.export.overwrite, max_shard_size=shards,
                          report_dir=self.out / "sparsify")
        else:
            export(model, target, tokenizer=self.tok, recipe=as_json, overwrite=recipe.export.overwrite,
                   max_shard_size=shards)
        summary["model_dir"] = str(target)
        summary["stages"].append("export")
