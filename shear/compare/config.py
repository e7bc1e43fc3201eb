"""CompareConfig: what ``shear compare`` measures (unknown keys are errors).

    CompareConfig(ratios=[0.3, 0.5], kd_steps=150)                     # the defaults below otherwise
    CompareConfig(ratios=[0.5], structured=["flap:global", "obs:global:heads+mlp"], pattern=None)

Structured rows are named ``ESTIMATOR:ALLOCATION[:STRUCTURES]`` (structures joined by ``+``, default
``heads+mlp``); the FIRST one sets the non-zero budget the unstructured row is matched to.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


def parse_structured(spec: str) -> tuple[str, str, list[str]]:
    """``"flap:pool"`` -> ``("flap", "pool", ["heads", "mlp"])``; checked against the prune configs."""
    from shear.prune.config import ImportanceConfig, PruneConfig

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{spec!r}: expected ESTIMATOR:ALLOCATION[:STRUCTURES], e.g. flap:global or flap:pool:heads+mlp")
    structures = parts[2].split("+") if len(parts) == 3 else ["heads", "mlp"]
    try:  # unknown estimators, allocations and structures fail here, naming what is accepted
        ImportanceConfig(estimator=parts[0])
        PruneConfig(target={"ratio": 0.5}, allocation=parts[1], structures=structures)
    except ValidationError as e:
        raise ValueError(f"{spec!r}: {'; '.join(err['msg'] for err in e.errors())}") from None
    return parts[0], parts[1], structures


class CompareConfig(BaseModel):
    """Structured vs unstructured vs N:M at equal non-zero parameters (and equal bytes), with and without KD."""

    model_config = ConfigDict(extra="forbid")

    ratios: list[float] = Field(description="budgets: fractions of the model's parameters removed (each in (0, 1))")
    structured: list[str] = Field(
        default_factory=lambda: ["obs:balanced", "flap:uniform"],
        description="structured rows, ESTIMATOR:ALLOCATION[:STRUCTURES] (shear prune's estimators and allocations); "
                    "the first sets the non-zero budget of the unstructured rows; pool rows score with standardized scores")
    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "sparsegpt", description="how single weights are chosen for the unstructured and N:M rows")
    pattern: str | None = Field("2:4", description="the N:M row (fixed share of the block linears; one row for all "
                                                   "budgets); null = no N:M row")
    equal_bytes: bool = Field(True, description="also an unstructured row whose compressed-tensors weights take as many "
                                                "bytes as the first structured row's safetensors")
    kd_steps: int = Field(150, ge=0, description="KD recovery steps of every row (0 = no recovery rows); the same data "
                                                 "order, recipe and teacher (the dense model) for all")
    batch_size: int = Field(8, gt=0, description="KD sequences per step")
    seq_len: int = Field(128, gt=1, description="tokens per KD block, calibration sequence and PPL window")
    lr: float = Field(1e-3, gt=0, description="KD peak learning rate (AdamW, 10% warmup, cosine)")
    ce_weight: float = Field(0.5, ge=0, description="KD loss: weight of cross-entropy on the data")
    kd_weight: float = Field(0.5, ge=0, description="KD loss: weight of forward KL to the dense teacher")
    temperature: float = Field(1.0, gt=0, description="KD temperature")
    source: str | list[str] | None = Field(
        None, description="text for calibration and KD (its train split): 'english', 'shakespeare', local file/dir "
                          "path(s) or an HF dataset name; null = the text shear trained the model on (its "
                          "shear_recipe.yaml), else 'english'")
    n_samples: int = Field(32, gt=0, description="calibration sequences (train split, shared by every row)")
    eval_dataset: str | None = Field(
        None, description="held-out text: its validation split ('english', 'shakespeare', an HF dataset), or a local "
                          ".txt / .jsonl file read whole; null = the source's own validation split when the source "
                          "is 'english' or 'shakespeare', else 'english'")
    eval_windows: int | None = Field(200, gt=0, description="held-out PPL: first N non-overlapping windows of the "
                                                            "validation split (null = all)")
    eval_batch_size: int = Field(8, gt=0, description="windows per forward pass when scoring PPL")
    speed_rounds: int = Field(5, gt=0, description="rounds of the interleaved speed measurement (every model once "
                                                   "per round; the median over rounds is reported)")
    prefill_tokens: int = Field(128, gt=0, description="speed: prompt length (batch 1)")
    decode_tokens: int = Field(32, ge=2, description="speed: tokens generated (batch 1, KV cache)")
    sparse_kernel: bool = Field(True, description="also time the sparse rows with shear.kernels' SparseLinear "
                                                  "(to_sparse_linear_) where that package is installed")
    threads: int | None = Field(None, gt=0, description="torch threads for the speed measurement (null = as set)")
    seed: int = Field(0, description="seed of calibration, data order and initialisation")
    keep_models: bool = Field(False, description="keep every row's exports under OUT/models (else they are written, "
                                                 "measured and deleted)")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one ratio")
        bad = [r for r in v if not 0.0 < r < 1.0]
        if bad:
            raise ValueError(f"each ratio must be in (0, 1), got {bad}")
        return sorted(set(v))

    @field_validator("structured")
    @classmethod
    def _structured(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one structured row (it sets the non-zero budget)")
        for s in v:
            parse_structured(s)
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from shear.sparse.masks import parse_pattern

        n, m = parse_pattern(v)
        return f"{n}:{m}"
