"""LoRA through peft: wrap a model with adapters chosen by name or regex, merge them at the end."""
from __future__ import annotations

import re

import torch.nn as nn

from .config import LoraConfig


def peft_targets(targets: list[str] | str) -> list[str] | str:
    """Our selection -> peft's: a list of names (suffix match) or one regex (full match on the path).

    "q_proj" -> ["q_proj"]; "re:.*layers\\.0\\..*proj" -> that regex; a list mixing names and
    "re:" entries -> one alternation where a name N becomes "(.*\\.)?N".
    """
    items = [targets] if isinstance(targets, str) else list(targets)
    if not any(t.startswith("re:") for t in items):
        return items
    alts = [t[3:] if t.startswith("re:") else rf"(?:.*\.)?{re.escape(t)}" for t in items]
    for a in alts:
        re.compile(a)
    return "|".join(f"(?:{a})" for a in alts)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze the model and add trainable adapters; returns a peft model (a wrapper of `model`)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=peft_targets(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, pcfg)
    except ValueError as e:
        raise ValueError(f"train.lora.target_modules: {e}") from None
    return peft_model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold W + (alpha/r) B A into W and return the plain HF model (no peft layers left)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
