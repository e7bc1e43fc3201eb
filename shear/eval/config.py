"""Typed configuration of ``shear eval``: perplexity protocol, speed protocol, lm-eval tasks.

The perplexity numbers of the field are only comparable under the same protocol (dataset, split,
sequence length, stride); every field here that changes the number is printed next to it.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EvalConfig(BaseModel):
    """How a model is evaluated. Defaults: the embedded corpus' held-out split, windows of 256."""

    model_config = ConfigDict(extra="forbid")

    # --- perplexity protocol ---
    dataset: str = Field("shakespeare", description="'shakespeare' (the embedded corpus), a local .txt/.jsonl/.json "
                                                    "file, a directory of them (every document), or an HF dataset "
                                                    "name (offline: must be cached)")
    dataset_config: str | None = Field(None, description="HF dataset configuration name, e.g. 'wikitext-2-raw-v1'")
    split: str = Field("validation", description="split to score; 'validation' of the embedded corpus is held out "
                                                 "(macbeth, tempest); ignored for a local .txt file")
    text_field: str = Field("text", description="column holding the text in jsonl / HF datasets")
    seq_len: int = Field(256, description="tokens per window (the model's context during scoring); at least 2")
    stride: int | None = Field(None, gt=0, description="step between window starts; None = seq_len (non-overlapping). "
                                                       "With stride < seq_len only the last `stride` tokens of each "
                                                       "window after the first are scored")
    max_windows: int | None = Field(None, gt=0, description="score at most this many windows (None = the whole split)")
    batch_size: int = Field(4, gt=0, description="windows per forward pass")
    perplexity: bool = Field(True, description="measure perplexity")

    # --- speed protocol (CPU, batch 1) ---
    speed: bool = Field(True, description="measure prefill and decode latency")
    prefill_tokens: int = Field(128, gt=0, description="prompt length of the prefill measurement (one forward pass)")
    decode_tokens: int = Field(32, gt=1, description="tokens generated greedily with the KV cache per decode measurement")
    repeats: int = Field(5, gt=0, description="timed repetitions; the median is reported")
    warmup: int = Field(1, ge=0, description="untimed repetitions before timing")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads during timing (None = leave as is)")

    # --- cost ---
    macs_context: int | None = Field(None, gt=0, description="context length at which attention score/value MACs "
                                                             "per token are reported (None = seq_len)")

    # --- lm-eval-harness (optional extra) ---
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names run zero-shot (needs shear[eval])")
    task_include_path: str | None = Field(None, description="directory of extra lm-eval task YAMLs (local tasks)")
    task_limit: int | None = Field(None, gt=0, description="at most this many examples per task (testing only)")

    # --- comparison ---
    vs: str | None = Field(None, description="directory of a second model (e.g. the original) evaluated side by side")

    @field_validator("seq_len")
    @classmethod
    def _two_tokens(cls, v):
        if v < 2:
            raise ValueError("must be at least 2: a window of 1 token scores nothing "
                             "(its perplexity would be 1.0 trivially)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride: {self.stride} is larger than seq_len={self.seq_len}; tokens would go unscored")
        return self

    @property
    def effective_stride(self) -> int:
        """The stride actually used (seq_len when unset)."""
        return self.stride if self.stride is not None else self.seq_len
