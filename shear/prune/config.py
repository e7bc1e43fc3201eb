"""Typed configs of the prune stage: how groups are scored (``importance``) and what is removed (``prune``).

Recipe sections (every key documented below; unknown keys are errors)::

    importance: {estimator: obs, aggregation: sum, n_samples: 128, seq_len: 512}
    prune:
      target: {ratio: 0.35}            # or {params: 4_000_000} or {shape: {intermediate_size: 512}}
                                       # or {shape_from: path/to/smaller/config.json}
      structures: [heads, mlp]         # what may shrink: heads, mlp, hidden, layers
      allocation: balanced             # balanced: same widths in every layer, heads/MLP split by scores; uniform; global; pool
      round_to: 8
      protected_layers: [0]            # or a regex on the layer index, e.g. "^(0|5)$"
      learn: {steps: 100}              # learned masks (Sheared-LLaMA) instead of one-shot scores
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRUCTURES = ("heads", "mlp", "hidden", "layers")


class ImportanceConfig(BaseModel):
    """How groups are scored. Estimators are registered by name in ``shear.importance``."""

    model_config = ConfigDict(extra="forbid")

    estimator: str = Field("obs", description="width estimator (default obs: on SmolLM2-135M and the reference teacher it "
                                              "beat FLAP, docs/BENCHMARKS.md): magnitude_l1, magnitude_l2, taylor_vector, taylor_element1, "
                                               "taylor_element2, wanda_sp, flap, minitron, random, obs (heads/MLP: OBS scores + refit of the kept weights), "
                                               "loraprune (prune.tune_rounds > 1 with train.lora only); "
                                               "see `shear.importance.ESTIMATORS`")
    layer_estimator: str | None = Field("block_influence", description="estimator for whole layers / sublayers: block_influence, "
                                                                       "angular, random; None = the width estimator scores them too")
    aggregation: Literal["sum", "mean", "max", "prod", "first"] = Field("sum", description="how the per-member scores of a group's "
                                                                                            "parameters combine into one score per unit")
    n_samples: int | None = Field(None, gt=0, description="calibration sequences; None = 128 (32 for the reference "
                                                        "models' Shakespeare corpus; shear.data.calibration)")
    seq_len: int | None = Field(None, gt=1, description="tokens per calibration sequence; None = 512 capped at the model's "
                                                      "positions (128 for the reference models' Shakespeare corpus)")
    seed: int = Field(0, description="seed of the calibration sampler and of the random estimator")
    source: str | list[str] | None = Field(None, description="calibration text: 'english', 'shakespeare', local file/dir path(s) or "
                                                              "an HF dataset name; None = the recipe's data section (data.source), "
                                                              "else the text shear trained the model on (its shear_recipe.yaml), "
                                                              "else general English ('english'); said in the log and report")
    device: str | None = Field(None, description="device for scoring and slicing, e.g. 'cuda' (the model moves there and back; "
                                                 "under accelerate launch / torchrun 'cuda' is each rank's own GPU, cuda:LOCAL_RANK); "
                                                 "'auto' = that GPU when CUDA is available, else where the model is; "
                                                 "None = where the model is (a model loaded with model.device_map stays spread)")
    batch_size: int = Field(8, gt=0, description="sequences per forward pass while calibrating (per-sample gradients use 1)")
    standardize: bool | None = Field(None, description="standardize scores of each kind across layers (FLAP); None = the "
                                                       "estimator's own default (on for flap, off otherwise)")
    gradient_checkpointing: bool = Field(False, description="gradient criteria: recompute activations in backward (less memory)")
    bias_compensation: bool | None = Field(None, description="after slicing, add b = W[:, removed] @ mean(X_removed) to o_proj / "
                                                             "down_proj (FLAP; with obs: the bias refitted with the kept "
                                                             "columns instead); None = on for flap and obs")

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        from shear.importance import ESTIMATORS

        if v not in ESTIMATORS:
            raise ValueError(f"unknown estimator {v!r}; expected one of {sorted(ESTIMATORS)}")
        return v

    @field_validator("layer_estimator")
    @classmethod
    def _known_layer_estimator(cls, v: str | None) -> str | None:
        from shear.importance import ESTIMATORS

        if v is not None and v not in ESTIMATORS:
            raise ValueError(f"unknown estimator {v!r}; expected one of {sorted(ESTIMATORS)}")
        return v


class TargetShape(BaseModel):
    """An explicit target architecture; unset fields keep their current size."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int | None = Field(None, gt=0, description="residual width after pruning")
    num_attention_heads: int | None = Field(None, gt=0, description="query heads per layer")
    num_key_value_heads: int | None = Field(None, gt=0, description="KV heads per layer (heads='kv_group' removes whole groups)")
    intermediate_size: int | None = Field(None, gt=0, description="MLP channels per layer")
    num_hidden_layers: int | None = Field(None, gt=0, description="decoder layers kept")


class TargetConfig(BaseModel):
    """How much to remove: exactly one of ``ratio``, ``params`` or ``shape``."""

    model_config = ConfigDict(extra="forbid")

    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of the model's PARAMETERS to remove (not of channels)")
    params: int | None = Field(None, gt=0, description="parameter budget: the pruned model has at most this many parameters")
    shape: TargetShape | None = Field(None, description="explicit target shape (hidden, heads, KV heads, intermediate, layers)")
    shape_from: str | None = Field(None, description="another model's config.json (or its directory): its shape "
                                   "(the TargetShape keys it has) becomes ``shape``, e.g. a smaller sibling's")

    @model_validator(mode="after")
    def _exactly_one(self):
        if self.shape_from is not None:  # a re-validated dump carries both; they must agree
            read = _shape_of_config(self.shape_from)
            if self.shape is not None and self.shape != read:
                raise ValueError(f"target.shape_from: {self.shape_from} gives {read.model_dump(exclude_none=True)}, "
                                 f"but target.shape is {self.shape.model_dump(exclude_none=True)}; set one of them")
            self.shape = read
        n = sum(x is not None for x in (self.ratio, self.params, self.shape))
        if n != 1:
            raise ValueError("target: set exactly one of ratio, params, shape, shape_from")
        return self


def _shape_of_config(path: str) -> TargetShape:
    """The :class:`TargetShape` keys found in a ``config.json`` (a file or the directory holding it)."""
    from pathlib import Path

    from shear.models import read_json

    p = Path(path).expanduser()
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"target.shape_from: {p} does not exist")
    cfg = read_json(p)
    keys = {k: cfg[k] for k in TargetShape.model_fields if cfg.get(k) is not None}
    if not keys:
        raise ValueError(f"target.shape_from: {p} has none of {list(TargetShape.model_fields)}")
    return TargetShape(**keys)


class LearnConfig(BaseModel):
    """Learned hard-concrete masks toward the target (Sheared-LLaMA; ``shear.shearing``), trained by the
    trainer with the recipe's train settings (batch, precision, data, distill) before recovery; the
    target shape is uniform, so the export is the stock class."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0, description="mask-learning optimizer steps (tokens: steps x the train section's global "
                                         "batch x data.seq_len, on top of train.steps of recovery)")
    warmup: int | None = Field(None, ge=0, description="steps over which the target size ramps linearly from the "
                                                       "full model to the target; None = 20% of steps")
    mask_lr: float = Field(0.1, gt=0, description="learning rate of the masks' log alpha (constant)")
    lambda_lr: float = Field(0.1, gt=0, description="learning rate of the Lagrange multipliers (gradient ascent, constant)")
    weight_lr: float | None = Field(None, ge=0, description="learning rate of the model weights while masks are learned "
                                                          "(train.lr schedule); None = train.lr; 0 = weights frozen")
    init: Literal["uniform", "scores"] = Field("uniform", description="uniform: every log alpha starts equal (Sheared-LLaMA); "
                                                                     "scores: ordered by the importance section's scores within "
                                                                     "each row (calibration as for one-shot pruning)")
    constraint: Literal["per_row", "per_type"] = Field(
        "per_row", description="per_row: the Lagrangian holds every row's expected size to the target (each layer's "
                               "heads and MLP channels, the hidden channels, the layers), one multiplier pair per "
                               "type (LLM-Shearing); per_type: only each type's total over the layers (rows may "
                               "drift apart, and the final per-layer top-k then cuts what a wide layer learned)")
    log_alpha_range: tuple[float, float] | None = Field(
        (-4.605170185988091, 4.605170185988092), description="log alpha is clamped to [low, high] after every optimizer step "
                                                     "(before every mask draw); default: LLM-Shearing's [log 1e-2, log 1e2] "
                                                     "~ [-4.61, 4.61]: P(z > 0) stays in [0.047, 0.998]; None = no clamp")
    eval_keep: Literal["expected", "target"] = Field(
        "expected", description="units each row of an eval (deterministic) mask keeps, the top ones by log alpha: "
                                "expected = round(expected kept units of the row); target = the target (LLM-Shearing's "
                                "default with a target model: the masked eval model is then the finished model)")
    hidden_norm: Literal["kept", "all"] = Field(
        "kept", description="hidden masks: RMSNorm statistics over the kept channels only (LLM-Shearing: the masked "
                            "model is the sliced model with its own norm weights) or over all channels (norm outputs "
                            "up to sqrt(d/k) larger while learning; the slicer folds sqrt(d/k) into the norm weights)")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup is not None and self.warmup > self.steps:
            raise ValueError(f"warmup: {self.warmup} exceeds steps ({self.steps})")
        if self.log_alpha_range is not None and not self.log_alpha_range[0] < self.log_alpha_range[1]:
            raise ValueError(f"log_alpha_range: low {self.log_alpha_range[0]} must be below high {self.log_alpha_range[1]}")
        return self

    def ramp(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 5)


class VocabTrimConfig(BaseModel):
    """Trim the token table to the tokens a text uses (WordPiece encoders; ``shear.prune.vocab``), before the
    structures are pruned. A ratio target still counts from the model before the trim."""

    model_config = ConfigDict(extra="forbid")

    source: str | list[str] | None = Field(None, description="text whose tokens stay ('shakespeare', local file/dir "
                                                              "path(s) or an HF dataset name); None = data.source, or "
                                                              "the shipped corpus without a data section")
    min_count: int = Field(1, ge=1, description="a token stays when the text uses it at least this often")
    max_size: int | None = Field(None, gt=0, description="at most this many tokens stay (the most frequent; special and "
                                                         "ASCII tokens always stay)")
    keep_ascii: bool = Field(True, description="keep every printable ASCII character and its ## form, so English words "
                                               "re-segment instead of becoming [UNK]")


class PruneConfig(BaseModel):
    """What to remove and where. Used by ``shear.prune.pipeline.run_prune`` and ``shear prune``."""

    model_config = ConfigDict(extra="forbid")

    target: TargetConfig = Field(description="how much to remove (parameter ratio, parameter budget, or target shape)")
    structures: list[Literal["heads", "mlp", "hidden", "layers"]] = Field(
        default_factory=lambda: ["heads", "mlp"],
        description="structures that may shrink with ratio/params targets: heads, mlp, hidden, layers")
    structure_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="fixed fraction of UNITS removed per structure (e.g. {layers: 0.25}); structures listed in `structures` "
                    "without a fixed ratio share one common fraction solved to meet the parameter target")
    allocation: Literal["balanced", "uniform", "global", "pool"] = Field(
        "balanced", description="balanced (default): the same kept widths in every layer, with the split between heads and MLP "
                                "channels that removes the least summed score at the target (stock class on export); "
                                "uniform: the same kept width in every layer, every structure losing the same fraction; "
                                "global: each structure's units ranked across layers "
                              "(per-layer widths, one removed fraction per structure); pool: heads and MLP channels of all layers "
                              "ranked in ONE pool (FLAP's AL-AM: needs standardized scores, e.g. flap), so the split between "
                              "attention and MLP follows the scores")
    heads: Literal["kv_group", "query_head"] = Field(
        "kv_group", description="GQA head strategy: remove whole KV groups (default: the KV cache shrinks too), or the same "
                                "number of query heads inside each group (finer; keeps every KV head)")
    round_to: int = Field(1, gt=0, description="kept MLP / hidden widths are multiples of this (8, 64, 128); heads round to 1; "
                                                "hidden also rounds to the head count where the stock config requires it (Llama, Gemma2)")
    protected_layers: list[int] | str = Field(
        default_factory=list, description="layers never pruned: indices, or a regex matched against the layer index string")
    min_keep: int = Field(1, ge=0, description="units every width group keeps at least (per layer)")
    iterative_steps: int = Field(1, gt=0, description="score, prune a step, rescore: the target is reached in this many equal steps")
    tune_rounds: int = Field(1, gt=0, description="prune while tuning: K rounds of prune a fraction, tune train.steps/K steps, "
                                                  "rescore (needs a train section; 1 = prune once, then train)")
    vocab: VocabTrimConfig | None = Field(None, description="trim the vocabulary first (WordPiece encoders): token rows "
                                                            "a text never uses go, the tokenizer with them")
    learn: LearnConfig | None = Field(None, description="learn hard-concrete masks toward the target in training "
                                                        "(needs a train section; uniform widths; no importance section)")

    @field_validator("structure_ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if k not in STRUCTURES:
                raise ValueError(f"structure_ratios.{k}: unknown structure; expected one of {STRUCTURES}")
            if not 0.0 <= r < 1.0:
                raise ValueError(f"structure_ratios.{k}: must be in [0, 1), got {r}")
        return v

    @field_validator("protected_layers")
    @classmethod
    def _regex(cls, v):
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"protected_layers: invalid regex {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _learned(self):
        if self.learn is None:
            return self
        clash = [k for k, bad in (("allocation", self.allocation != "uniform" and "allocation" in self.model_fields_set),
                                  ("structure_ratios", bool(self.structure_ratios)),
                                  ("protected_layers", bool(self.protected_layers)),
                                  ("iterative_steps", self.iterative_steps > 1), ("tune_rounds", self.tune_rounds > 1))
                 if bad]
        if clash:
            raise ValueError(f"learn: learned masks reach one uniform target shape; {clash[0]} does not apply to them")
        self.allocation = "uniform"
        return self

    def is_protected(self, layer: int | None) -> bool:
        """True when ``layer`` (an index, None for model-wide groups) must not be pruned."""
        if layer is None:
            return False
        if isinstance(self.protected_layers, str):
            return re.fullmatch(self.protected_layers, str(layer)) is not None
        return layer in self.protected_layers
