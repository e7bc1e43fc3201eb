"""Structured vs unstructured vs N:M on one model, at the same non-zero parameters and the same bytes.

    from shear.compare import CompareConfig, run_compare
    report = run_compare(model, tokenizer, CompareConfig(ratios=[0.3, 0.5], kd_steps=150), "runs/compare")
"""
from shear.compare.config import CompareConfig
from shear.compare.run import run_compare

__all__ = ["CompareConfig", "run_compare"]
