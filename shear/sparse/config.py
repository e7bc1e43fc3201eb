"""SparsifyConfig: the ``sparsify:`` section of a recipe (unknown keys are errors).

    sparsify: {method: sparsegpt, sparsity: 0.5}            # 50% unstructured, uniform over layers
    sparsify: {method: wanda, pattern: "2:4"}               # 2:4 (what sparse tensor cores run)
    sparsify: {method: wanda, sparsity: 0.7, allocation: owl, n_samples: 32, seq_len: 512}
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: the calibration length when seq_len is unset: the model's max_position_embeddings, capped here
#: (a 128k-context model would otherwise calibrate on 128 x 131072 tokens)
MAX_DEFAULT_SEQ_LEN = 4096


class SparsifyConfig(BaseModel):
    """Which weights to zero, chosen one block at a time on calibration text (``shear.sparse.sparsify_``)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "sparsegpt", description="magnitude: |W| over the whole matrix, no data; wanda: |W| * ||X_j|| within each "
                                 "output row, no weight update; sparsegpt: OBS mask and update of the remaining "
                                 "weights from H = 2 X^T X")
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of each pruned linear's weights set to "
                                                                     "zero (unstructured); exactly one of sparsity and pattern")
    pattern: str | None = Field(None, description="N:M semi-structured sparsity, e.g. '2:4' or '4:8': keep N of every M "
                                                  "consecutive input weights of each row")
    allocation: Literal["uniform", "owl"] = Field(
        "uniform", description="per-layer sparsity: uniform, or owl (outlier-weighted: layers with more Wanda-score "
                               "outliers keep more; mean over layers = sparsity; unstructured only)")
    owl_m: float = Field(5.0, gt=0.0, description="owl: a score is an outlier above owl_m x the mean score of its layer")
    owl_lambda: float = Field(0.08, ge=0.0, lt=1.0, description="owl: largest deviation of a layer's sparsity from the target")
    targets: list[str] | None = Field(
        None, description="linears to prune: names matched against the end of the module path (q_proj, mlp.down_proj) "
                          "or 're:REGEX' fully matching it; null = every Linear (and GPT-2 Conv1D) inside the blocks. "
                          "Embeddings and the LM head are never pruned; each entry must match a linear in the blocks")
    n_samples: int = Field(128, gt=0, description="calibration sequences (the SparseGPT / Wanda convention is 128)")
    seq_len: int | None = Field(None, gt=1, description="tokens per calibration sequence; null = the model's "
                                                         f"max_position_embeddings, at most {MAX_DEFAULT_SEQ_LEN}")
    batch_size: int = Field(8, gt=0, description="calibration sequences per forward pass")
    seed: int = Field(0, description="seed of the calibration sampler")
    source: str | list[str] | None = Field(None, description="calibration text: 'shakespeare', local file/dir path(s) or an "
                                                              "HF dataset name; null = the recipe's data section, else the "
                                                              "shipped corpus")
    blocksize: int = Field(128, gt=0, description="sparsegpt: columns per lazy-update block (a multiple of M for N:M)")
    dampening: float = Field(0.01, ge=0.0, description="sparsegpt: added to diag(H) as a fraction of its mean")
    device: str | None = Field(None, description="device for calibration and pruning, e.g. 'cuda' (the model moves there "
                                                 "and back; under accelerate launch / torchrun 'cuda' is each rank's own GPU; 'auto' = that GPU when "
                                                 "CUDA is available, else where the model is); "
                                                 "null = where the model is")
    compressed: bool = Field(True, description="with an export section, also write OUTPUT_DIR/compressed in the "
                                               "compressed-tensors format (bitmask, or sparse-24-bitmask for 2:4)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from shear.sparse.masks import parse_pattern

        n, m = parse_pattern(v)
        return f"{n}:{m}"

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or any(not t or t == "re:" for t in v):
            raise ValueError("needs at least one non-empty module name or 're:REGEX'")
        for t in v:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ValueError(f"{t!r} is not a valid regex: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_target(self):
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("sparsity: give exactly one of sparsity (unstructured) and pattern (N:M)")
        if self.allocation == "owl" and self.pattern is not None:
            raise ValueError("allocation: owl allocates unstructured sparsity; an N:M pattern is the same in every layer")
        if self.method == "magnitude" and self.allocation == "uniform" and self.source is not None:
            raise ValueError("source: magnitude uses no calibration text (|W| alone, uniform allocation); drop source")
        if self.pattern is not None and self.method == "sparsegpt" and self.blocksize % self.nm[1]:
            raise ValueError(f"blocksize: {self.blocksize} is not a multiple of M={self.nm[1]} (pattern {self.pattern})")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of the pattern, or None (unstructured)."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)
