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


def default_targets(model: nn.Module) -> list[str]:
    """Every projection of the model's family (``shear.analyze.families.lora_targets``)."""
    from shear.analyze.families import family_of, lora_targets

    fam = family_of(model)
    if fam is None:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"train.lora.target_modules: no default LoRA targets for model type {kind!r}; "
                         f"list the modules to adapt")
    return lora_targets(fam)


def unmatched_targets(module_names: list[str], targets: list[str] | str) -> list[str]:
    """The entries of ``targets`` that match none of ``module_names`` (same rules as peft_targets:
    a name matches a path equal to it or ending with ``.name``; ``re:R`` fully matches the path)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    missing = []
    for t in items:
        if t.startswith("re:"):
            rx = re.compile(t[3:])
            hit = any(rx.fullmatch(n) for n in module_names)
        else:
            hit = any(n == t or n.endswith("." + t) for n in module_names)
        if not hit:
            missing.append(t)
    return missing


def resolve_targets(model: nn.Module, targets: list[str] | str | None) -> list[str] | str:
    """``targets`` (or the family default when None), checked: every entry must match a module.

    Refuses loudly: peft adapts whatever matches and only fails when *nothing* does, so a target
    list written for Llama would silently leave Phi-3's fused ``qkv_proj`` without adapters.
    """
    targets = default_targets(model) if targets is None else targets
    items = [targets] if isinstance(targets, str) else list(targets)
    missing = unmatched_targets([n for n, _ in model.named_modules() if n], items)
    if len(missing) == 1:
        raise ValueError(f"train.lora.target_modules: LoRA: target {missing[0]!r} matched no module")
    if missing:
        raise ValueError(f"train.lora.target_modules: LoRA: {len(missing)} of {len(items)} targets matched "
                         f"nothing: {', '.join(repr(m) for m in missing)}")
    return targets


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze the model and add trainable adapters; returns a peft model (a wrapper of `model`).

    ``cfg.target_modules`` None = every projection of the model's family; a target that matches
    no module is an error (``resolve_targets``).
    """
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from shear.analyze.families import family_of

    targets = resolve_targets(model, cfg.target_modules)
    fam = family_of(model)
    get_head = getattr(model, "get_output_embeddings", None)
    causal = callable(get_head) and get_head() is not None  # BertModel: plain PeftModel
    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=peft_targets(targets), bias="none",
                          fan_in_fan_out=bool(fam and fam.conv1d),  # GPT-2 Conv1D stores [in, out]
                          task_type="CAUSAL_LM" if causal else None)
    try:
        peft_model = get_peft_model(model, pcfg)
    except ValueError as e:
        raise ValueError(f"train.lora.target_modules: {e}") from None
    return peft_model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold W + (alpha/r) B A into W and return the plain HF model (no peft layers left).

    The merged update is dense: a sparse model's pruned weights are zeroed again after the merge
    (``shear.sparse.recovery.MaskKeeper.finalize``, which measures what that costs)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
