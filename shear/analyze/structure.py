"""Recognise a decoder of an unlisted ``model_type`` by its modules: a Llama-shaped model gets the llama entry.

A model whose ``model_type`` has no :class:`~shear.analyze.families.Family` is checked against the llama
template (:func:`match_llama`): base-model ``embed_tokens``/``layers``/``norm``, and in every block
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` Linears with coupled shapes (GQA: ``k``/``v``
rows a divisor of ``q``'s), RMSNorms ``input_layernorm``/``post_attention_layernorm`` (optional per-head
``self_attn.q_norm``/``k_norm``), nothing else holding parameters, and the config keys the slicer rewrites.
Norms are recognised by what they compute (``x / rms(x) * w`` on a copy with random weights), not by
their class; their ε must be the config's ``rms_norm_eps`` (the stock class builds them from it, and hidden
slicing rescales both). The first thing that does not fit is the reason returned, named by its full path.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import weakref

import torch
from torch import nn

#: config keys a Llama-shaped model must carry: what the slicer rewrites and the stock class reads back
CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size",
               "num_hidden_layers", "head_dim", "rms_norm_eps")
_PROJ = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
_NORMS = ("input_layernorm", "post_attention_layernorm")
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
log = logging.getLogger("shear")
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def match_llama(model: nn.Module, llama: "Family") -> tuple["Family | None", str]:
    """``(llama Family, "")`` when ``model``'s modules fit the llama template (``llama``: the llama entry of
    ``shear.analyze.families``, passed in by its callers there), else ``(None, reason)``.

    The entry returned keeps only the bias flags the config has. Cached per model (slicing keeps the fit:
    dropped sublayers and per-layer widths are allowed)."""
    hit = _CACHE.get(model)
    if hit is None:
        try:
            hit = (_check(model, llama), "")
            log.info("model_type %r has no family entry; its modules fit the llama template: analyzed and "
                     "sliced as llama", getattr(model.config, "model_type", None))
        except _Misfit as e:
            hit = (None, str(e))
        except AttributeError as e:  # not built like a transformers PreTrainedModel
            hit = (None, f"{type(model).__name__}: {e}")
        _CACHE[model] = hit
    return hit


class _Misfit(Exception):
    pass


def _check(model: nn.Module, llama: "Family") -> "Family":
    fam, cfg = llama, model.config
    missing = [k for k in CONFIG_KEYS if not isinstance(getattr(cfg, k, None), (int, float))]
    if missing:
        raise _Misfit(f"config has no {missing[0]!r}")
    base = model.base_model
    prefix = next((n + "." for n, m in model.named_modules() if m is base and n), "")
    layers, emb = getattr(base, "layers", None), getattr(base, "embed_tokens", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise _Misfit(f"{prefix}layers: not a ModuleList of blocks")
    if not isinstance(emb, nn.Embedding) or emb is not model.get_input_embeddings():
        raise _Misfit(f"{prefix}embed_tokens: not the input embedding")
    d = emb.weight.shape[1]
    kinds: dict[type, bool] = {}
    _norm(base, "norm", prefix, d, cfg, kinds)
    head = model.get_output_embeddings()
    known = {id(p) for p in (emb.weight, getattr(base.norm, "weight", None), getattr(head, "weight", None))
             if p is not None}
    for n, p in model.named_parameters():
        if id(p) not in known and not n.startswith(f"{prefix}layers."):
            raise _Misfit(f"{n.rpartition('.')[0]}: not part of the llama template")
    for i, block in enumerate(layers):
        _block(block, f"{prefix}layers.{i}", d, cfg, kinds)
    flags = tuple(f for f in fam.bias_flags if isinstance(getattr(cfg, f[0], None), bool))
    return dataclasses.replace(fam, bias_flags=flags)


def _dropped(mod) -> bool:
    return mod is None or type(mod).__name__ in ("Dropped", "Identity")


def _block(block: nn.Module, bp: str, d: int, cfg, kinds: dict) -> None:
    """Check one block (see the module docstring); raises ``_Misfit`` naming the first module that does not fit."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    for n, _ in block.named_parameters():  # the modules named here are checked one by one below
        if n.rpartition(".")[0] not in _PROJ | set(_NORMS + _QK_NORMS):
            raise _Misfit(f"{bp}.{n.rpartition('.')[0]}: not part of the llama template")
    lin = {}
    for p in _PROJ:
        if _dropped(attn if p.startswith("self_attn") else mlp):
            continue
        try:
            mod = block.get_submodule(p)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise _Misfit(f"{bp}.{p}: missing or not a Linear")
        lin[p.split(".")[1]] = mod
    if "q_proj" in lin:
        q, k, v, o = (lin[f"{x}_proj"] for x in "qkvo")
        D = getattr(attn, "head_dim", None)
        groups = getattr(attn, "num_key_value_groups", None)
        if not (isinstance(D, int) and isinstance(groups, int)):
            raise _Misfit(f"{bp}.self_attn: no int head_dim / num_key_value_groups (what forward reads)")
        if {q.in_features, k.in_features, v.in_features, o.out_features} != {d} or k.out_features != v.out_features \
                or q.out_features % D or k.out_features % D or q.out_features != o.in_features \
                or q.out_features // D != groups * (k.out_features // D):
            raise _Misfit(f"{bp}.self_attn: q/k/v/o shapes are not {groups} query heads of {D} per KV head")
        for qk in _QK_NORMS:
            if hasattr(attn, qk.split(".")[1]):
                _norm(block, qk, bp, None, cfg, kinds)
        _norm(block, _NORMS[0], bp, d, cfg, kinds)
    if "up_proj" in lin:
        g, u, dn = lin["gate_proj"], lin["up_proj"], lin["down_proj"]
        if {g.in_features, u.in_features, dn.out_features} != {d} or not g.out_features == u.out_features == dn.in_features:
            raise _Misfit(f"{bp}.mlp: gate/up/down shapes do not couple (hidden {d})")
        _norm(block, _NORMS[1], bp, d, cfg, kinds)


def _norm(parent: nn.Module, path: str, prefix: str, d: int | None, cfg, kinds: dict) -> None:
    """An RMSNorm ``x / sqrt(mean(x²) + ε) * w`` of width ``d`` (None: any), ε = ``config.rms_norm_eps``."""
    name = f"{prefix.rstrip('.')}.{path}".lstrip(".")
    try:
        mod = parent.get_submodule(path)
    except AttributeError:
        raise _Misfit(f"{name}: missing") from None
    if _dropped(mod):
        return
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1 or (d is not None and w.shape[0] != d):
        raise _Misfit(f"{name}: not a norm over {d or 'the head'} channels")
    eps = next((getattr(mod, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(mod, a, None), float)), None)
    if eps != cfg.rms_norm_eps or not type(mod).__name__.endswith("RMSNorm"):
        raise _Misfit(f"{name}: {type(mod).__name__} is not an RMSNorm with ε = config.rms_norm_eps")
    if type(mod) not in kinds:
        kinds[type(mod)] = _computes_rms(mod, eps)
    if not kinds[type(mod)]:
        raise _Misfit(f"{name}: {type(mod).__name__} does not compute x / rms(x) * w")


def _computes_rms(mod: nn.Module, eps: float) -> bool:
    """Run a CPU copy of ``mod`` with random weights (meta modules too) against ``x / rms(x) * w``."""
    m = copy.deepcopy(mod).to_empty(device="cpu").float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(2, 3, m.weight.shape[0], generator=gen)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * m.weight
        try:
            got = m(x)
        except Exception:  # noqa: BLE001 - any failure is a misfit, named by the caller
            return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got.float(), want, atol=1e-5)
