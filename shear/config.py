"""Recipes: YAML validated by typed models, one section per stage. YAML maps to code here only.

A recipe names the stages it runs by the sections it has::

    model: {path: reference}          # what to start from
    data: {source: shakespeare, seq_len: 256}
    prune: {target: {ratio: 0.5}}      # analyze -> score -> plan -> slice
    sparsify: {method: sparsegpt, sparsity: 0.5}   # or zero single weights (not with prune)
    train: {steps: 200, lr: 3e-4}      # recovery (with distill: KD from the unpruned model)
    distill: {kd_weight: 1.0}
    export: {}                         # save_pretrained directory
    eval: {seq_len: 256}

Unknown keys, wrong types and out-of-range values fail before any work starts, with the dotted key
(``recipe.train.lr``) and what was expected. ``key=value`` overrides use the same dotted paths and
YAML values (``train.steps=10``, ``prune.target.ratio=0.35``, ``eval.tasks=[piqa]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shear.data.text import DataConfig
from shear.eval.config import EvalConfig
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.sparse.config import SparsifyConfig
from shear.storage import MAX_SHARD_SIZE, shard_size
from shear.train.config import DistillConfig, TrainConfig


class ModelConfig(BaseModel):
    """The model a recipe starts from."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="HF hub name, local directory, or 'reference' / 'reference-quick' (built on the embedded corpus)")
    init: Literal["pretrained", "scratch"] = Field("pretrained", description="load weights from path, or build a new model of architecture `arch` (pretraining)")
    arch: str | dict | None = Field(None, description="init=scratch: a reference architecture name or LlamaConfig keyword arguments")
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model's); init=scratch trains a BPE on the data when unset")
    tokenizer_vocab: int = Field(2048, ge=259, description="init=scratch: vocabulary size of the BPE trained on the data")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="weights dtype when loading")
    trust_remote_code: bool = Field(False, description="consent to run modeling code shipped in a model directory "
                                    "(auto_map: per-layer pruned exports); also covers distill.teacher")
    device_map: str | None = Field(None, description="'auto' spreads a model larger than one GPU over the GPUs (and CPU) for "
                                                     "scoring and pruning; None = load on the CPU")


class ExportConfig(BaseModel):
    """How the result is written."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(None, description="output directory of the exported model (default: OUTPUT_DIR/model); {cache} is the shear cache (~/.cache/shear)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] | None = Field(
        None, description="cast weights before saving (the model evaluated after export is the cast one); auto: the "
                          "dtype model.path is stored in (shear prune/sparsify's default); null: keep the model's")
    max_shard_size: int | str = Field(MAX_SHARD_SIZE, description="largest weights file: bytes or '5GB', '500MB'; bigger "
                                                                  "models are split with model.safetensors.index.json")
    overwrite: bool = Field(False, description="replace a model already in dir (otherwise that is an error)")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v):
        return shard_size(v)


class Recipe(BaseModel):
    """A whole run. Sections that are absent are stages that do not run."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field("", description="one line: what this recipe is for (shown by `shear recipes`)")
    output_dir: str = Field("runs/{name}", description="where outputs go; {name} is the recipe file's stem")
    seed: int = Field(0, description="global seed")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig, description="text used for training, calibration and evaluation")
    importance: ImportanceConfig | None = Field(None, description="how to score groups (used by prune)")
    prune: PruneConfig | None = Field(None, description="what to remove; absent = no pruning")
    sparsify: SparsifyConfig | None = Field(None, description="zero single weights (unstructured or N:M) instead of "
                                                              "removing structures; absent = not run")
    train: TrainConfig | None = Field(None, description="training / recovery; absent = no training")
    distill: DistillConfig | None = Field(None, description="distillation from the unpruned teacher during train")
    export: ExportConfig | None = Field(None, description="write the resulting model; absent = no export")
    eval: EvalConfig | None = Field(None, description="evaluate the result (and the original when pruned)")

    @model_validator(mode="after")
    def _stages_fit(self):
        if self.distill is not None and self.train is None:
            raise ValueError("distill: distillation happens during training; add a train section")
        if self.distill is not None and self.distill.teacher is None and self.prune is None and self.sparsify is None:
            raise ValueError("distill.teacher: no teacher; name one, or add a prune or sparsify section "
                             "(the unpruned model is then the teacher)")
        if self.prune is not None and self.sparsify is not None:
            raise ValueError("sparsify: prune and sparsify in one recipe is not supported; prune and export first, "
                             "then sparsify the export (model.path)")
        if self.prune is not None and self.prune.tune_rounds > 1 and self.train is None:
            raise ValueError("prune.tune_rounds: prune while tuning needs a train section")
        if self.prune is not None and self.prune.vocab is not None:
            if self.distill is not None and self.distill.teacher is not None:
                raise ValueError("prune.vocab: the teacher must see the student's token ids; with a vocabulary trim the "
                                 "teacher is the unpruned model of the run (remove distill.teacher)")
            if self.prune.learn is not None or self.prune.tune_rounds > 1:
                raise ValueError("prune.vocab: vocabulary trimming goes with one-shot pruning (not prune.learn or "
                                 "prune.tune_rounds)")
        if self.prune is not None and self.prune.learn is not None:
            if self.train is None:
                raise ValueError("prune.learn: masks are learned by the trainer; add a train section")
            if self.importance is not None and self.prune.learn.init != "scores":
                raise ValueError("importance: prune.learn learns its masks; the importance section is used only with "
                                 "prune.learn.init: scores (remove it, or set that)")
            if self.train.lora is not None and self.prune.learn.weight_lr != 0:
                raise ValueError("prune.learn.weight_lr: with train.lora the mask stage cannot train adapters; set "
                                 "prune.learn.weight_lr: 0 (frozen weights while masks are learned)")
        return self


def format_errors(err: ValidationError, root: str = "recipe") -> str:
    """The errors of a pydantic validation by dotted key: one line for one error, else one line each."""
    lines = []
    for e in err.errors():
        key = ".".join([root] + [str(p) for p in e["loc"] if not str(p).startswith("function-")])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif isinstance(e.get("input"), dict):  # a section-level check: the message names the field
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return f"invalid {root}: {lines[0]}" if len(lines) == 1 else f"invalid {root}:\n  " + "\n  ".join(lines)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "prune.target.ratio=0.5"]`` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value with a dotted key, e.g. train.steps=10")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty part in dotted key {key!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is set to a value and used as a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return out


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of ``over`` win; a None section in base is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate_recipe(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise ValueError(f"invalid recipe: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ValueError(format_errors(e)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; ``{name}`` in output_dir becomes the file's stem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path}: not valid YAML: {e}") from None
    data = merge(data, parse_overrides(overrides or []))
    recipe = validate_recipe(data)
    recipe.output_dir = recipe.output_dir.replace("{name}", path.stem)
    return recipe


def smoke_recipe(recipe: Recipe) -> Recipe:
    """The recipe shrunk to check it end to end in minutes (``shear run RECIPE --smoke``).

    Every stage and option it names stays (model, dtype, LoRA, KD, prune structures and rounds,
    sequence lengths); only the amounts shrink: train 3 steps (at least one per prune round), no
    warmup, micro-batch <= 2, grad_accum <= 2, one validation batch, a checkpoint at the end; data
    <= 64 training and 4 validation blocks; 2 calibration samples (learned masks: 3 mask steps); eval 2 perplexity windows, one
    timed repeat of 16 + 4 tokens, <= 4 examples per lm-eval task. Outputs go to OUTPUT_DIR-smoke and
    the export to its ``model`` directory (never a shared one such as the cache), replaced on rerun.
    """
    d = recipe.model_dump(mode="json")
    d["output_dir"] = recipe.output_dir.rstrip("/") + "-smoke"
    data = d["data"]
    data.update(max_train_blocks=min(data["max_train_blocks"] or 64, 64),
                max_validation_blocks=min(data["max_validation_blocks"] or 4, 4))
    if d["train"] is not None:
        t, rounds = d["train"], d["prune"]["tune_rounds"] if d["prune"] else 1
        t.update(steps=min(t["steps"], max(3, rounds)), warmup_steps=0, batch_size=min(t["batch_size"], 2),
                 grad_accum=min(t["grad_accum"], 2), eval_every=0, eval_batches=1, save_every=0, log_every=1)
    if d["prune"] is not None and d["prune"]["learn"] is not None:
        d["prune"]["learn"].update(steps=min(d["prune"]["learn"]["steps"], 3), warmup=1)
    if d["prune"] is not None and (d["prune"]["learn"] is None or d["prune"]["learn"]["init"] == "scores"):
        d["importance"] = {**(d["importance"] or {}), "n_samples": 2}
    if d["sparsify"] is not None:
        d["sparsify"]["n_samples"] = 2
    if d["eval"] is not None:
        e = d["eval"]
        e.update(max_windows=min(e["max_windows"] or 2, 2), repeats=1, warmup=0,
                 prefill_tokens=min(e["prefill_tokens"], 16), decode_tokens=min(e["decode_tokens"], 4),
                 task_limit=min(e["task_limit"] or 4, 4))
    if d["export"] is not None:
        d["export"].update(dir=None, overwrite=True)
    return validate_recipe(d)


def dump_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe (every default filled in) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return path
