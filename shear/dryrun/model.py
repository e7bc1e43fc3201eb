"""The recipe's models on the meta device: config only, no weights read, nothing allocated.

``recipe_config`` finds the model config a recipe names (``--config-json``, a reference name, a local
directory, the local HF cache, or ``model.arch`` for pretraining); ``meta_model`` builds it with the
recipe's dtype; ``pruned_meta`` applies the plan the recipe's target gives to a meta copy.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from shear.dryrun.memory import Shape


def recipe_config(recipe, config_json: str | None = None):
    """``(transformers config, where it came from)`` of the recipe's model, without reading weights."""
    from transformers import AutoConfig, LlamaConfig

    from shear.models import REFERENCE_ARCHS, REFERENCE_VOCAB, check_remote_code, reference_config, resolve_model_path

    m = recipe.model
    if config_json:
        p = Path(config_json)
        if not p.exists():
            raise FileNotFoundError(f"--config-json: {p} does not exist")
        return AutoConfig.from_pretrained(str(p)), f"--config-json {p}"
    if m.init == "scratch":
        vocab, how = m.tokenizer_vocab, f"BPE trained to model.tokenizer_vocab = {m.tokenizer_vocab}"
        if m.tokenizer:
            from shear.models import load_tokenizer

            vocab, how = len(load_tokenizer(m.tokenizer)), f"tokenizer {m.tokenizer}"
        if isinstance(m.arch, str):
            return reference_config(m.arch, vocab_size=vocab), f"model.arch {m.arch!r}, vocabulary from {how}"
        if isinstance(m.arch, dict):
            return LlamaConfig(**{**m.arch, "vocab_size": vocab}), f"model.arch, vocabulary from {how}"
        raise ValueError("recipe.model.arch: init=scratch needs an architecture (a reference name or config keys)")
    if m.path in REFERENCE_ARCHS:
        return reference_config(m.path, vocab_size=REFERENCE_VOCAB), f"reference architecture {m.path!r}"
    path = resolve_model_path(m.path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local}: no config.json (pass --config-json PATH)")
        check_remote_code(str(local), m.trust_remote_code)
        return AutoConfig.from_pretrained(str(local), trust_remote_code=m.trust_remote_code), f"{local}/config.json"
    try:  # a hub id: its config.json only if the HF cache already holds it; never the network
        return (AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=m.trust_remote_code),
                f"{path} (config.json from the local HF cache)")
    except OSError:
        raise FileNotFoundError(f"model.path {m.path!r}: its config.json is not available offline (not a local "
                                "directory, not in the HF cache); pass --config-json PATH to a config.json of its "
                                "shape") from None


def meta_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``config`` with parameters on the meta device in ``dtype`` (as ``from_pretrained(dtype=...)``).
    It gets its own copy of ``config``: slicing it (pruned_meta) must not reshape the teacher or the unpruned model."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = copy.deepcopy(config)

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError:  # encoders have no causal-LM class
            return AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def offload_params(model: nn.Module) -> tuple[int, int]:
    """``(output embeddings' parameters, the largest other module's own parameters)``: what an offloaded teacher
    (shear.train.teacher.place_teacher, cpu_offload) keeps on the execution device, for the run and one module
    at a time. A tied head counts in both: the hooks move the input embeddings' copy of it on their own."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    resident = sum(p.numel() for p in head.parameters()) if head is not None else 0
    own = (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules() if m is not head)
    return resident, max(own, default=0)


def shape_of(config) -> Shape:
    """The activation-relevant sizes of a (decoder) config; GPT-2 style names are read too."""
    g = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    h = int(g("hidden_size", "n_embd", "d_model"))
    heads = int(g("num_attention_heads", "n_head"))
    kv_heads = int(g("num_key_value_heads") or heads)
    hd = int(g("head_dim") or h // heads)
    mlp = int(g("intermediate_size", "n_inner") or 4 * h)
    return Shape(layers=int(g("num_hidden_layers", "n_layer")), hidden=h, q=heads * hd, kv=kv_heads * hd, mlp=mlp,
                 vocab=int(g("vocab_size")))


def pruned_meta(model: nn.Module, prune_cfg) -> tuple[nn.Module, dict]:
    """Slice ``model`` (meta, in place) to the plan ``prune_cfg.target`` gives with every score equal; return
    ``(model, info)``. ``info['exact']``: the kept widths do not depend on scores (uniform allocation or a shape
    target), so the figures are those of the real run; otherwise they are one plan that meets the target."""
    from shear.analyze import analyze
    from shear.prune.plan import build_plan, model_shapes
    from shear.prune.slice import prune_

    graph = analyze(model, heads=prune_cfg.heads)
    scores = {g.name: torch.zeros(g.num_units) for g in graph.groups}
    cfg = prune_cfg
    if cfg.learn is not None and cfg.target.shape is None:  # learned masks: uniform widths toward the target
        cfg = cfg.model_copy(update={"allocation": "uniform"})
    plan = build_plan(graph, scores, cfg, model_shapes(model))
    exact = cfg.target.shape is not None or cfg.allocation == "uniform"
    prune_(model, plan, graph)
    how = ("exact: the target's widths do not depend on scores" if exact else
           f"estimate: allocation {cfg.allocation!r} splits the removal by scores; this is one plan meeting the target")
    return model, {"exact": exact, "how": how, "target_params": plan.meta.get("target_params"),
                   "mask_units": sum(g.num_units for g in graph.groups)}


def lora_params(model: nn.Module, lora_cfg) -> tuple[int, int]:
    """``(adapter parameters, adapted linears per layer)`` of ``lora_cfg`` on ``model``: r x (in + out) per adapted
    module (peft LoRA's A [r, in] and B [out, r]); targets resolved as shear.train.lora does."""
    import re

    from shear.train.lora import resolve_targets

    targets = resolve_targets(model, lora_cfg.target_modules)
    items = [targets] if isinstance(targets, str) else list(targets)
    total, names = 0, []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not name or w is None or w.ndim != 2 or isinstance(mod, nn.Embedding):
            continue
        hit = any(re.fullmatch(t[3:], name) if t.startswith("re:") else (name == t or name.endswith("." + t))
                  for t in items)
        if hit:
            total += lora_cfg.r * (w.shape[0] + w.shape[1])
            names.append(name)
    layers = max(1, int(getattr(model.config, "num_hidden_layers", 1) or 1))
    return total, -(-len(names) // layers)
