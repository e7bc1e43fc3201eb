"""The language model of a vision-language checkpoint as the causal LM transformers ships for its text config.

``shear prune``/``sparsify`` load a Gemma 3 checkpoint saved as ``Gemma3ForConditionalGeneration`` (vision
tower, projector, language model) as ``Gemma3ForCausalLM`` over its ``gemma3_text`` config: the same modules
(not copies) under the causal class, the vision tower dropped, said in one log line. Its logits on text equal
the multimodal model's, and the export is a plain ``gemma3_text`` checkpoint (no vision tower).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("shear")

#: multimodal model_type -> config changes that keep the causal class's text logits equal to the multimodal
#: class's: Gemma3ForConditionalGeneration never applies ``final_logit_softcapping`` (Gemma3ForCausalLM does)
TEXT_ONLY = {"gemma3": {"final_logit_softcapping": None}}


def text_only(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a multimodal type in :data:`TEXT_ONLY` its language model as the causal LM
    class of ``config.text_config`` (modules and text config shared, not copied)."""
    import transformers

    kind = getattr(model.config, "model_type", None)
    if kind not in TEXT_ONLY:
        return model
    text_cfg = model.config.get_text_config()
    cls = transformers.AutoModelForCausalLM._model_mapping[type(text_cfg)]
    lm, head = getattr(model.model, "language_model", None), model.get_output_embeddings()
    if lm is None or head is None:
        raise ValueError(f"{kind}: no model.language_model / lm_head in {type(model).__name__}; load the text "
                         f"model alone ({cls.__name__})")
    for k, v in TEXT_ONLY[kind].items():
        setattr(text_cfg, k, v)
    text_cfg.tie_word_embeddings = head.weight is lm.get_input_embeddings().weight
    text_cfg.architectures = [cls.__name__]
    with torch.device("meta"):
        causal = cls(text_cfg)
    causal.model, causal.lm_head, causal.config = lm, head, text_cfg
    left = [n for n, p in causal.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"{kind}: {left[0]} of {cls.__name__} has no counterpart in {type(model).__name__}")
    log.info("%s: pruning the language model only; it is %s over its %s config (vision tower dropped), and so "
             "is the export", type(model).__name__, cls.__name__, text_cfg.model_type)
    return causal.train(model.training)
