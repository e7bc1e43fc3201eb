"""Modeling code for pruned models whose shapes the stock config cannot express.

This file is copied verbatim beside the weights of such exports (per-layer head counts or MLP
widths, dropped attention/MLP sublayers, GPT-2/OPT heads that no longer multiply to the hidden
size). It depends on torch and transformers only. ``config.json`` keeps the stock ``model_type``
and adds:

* ``auto_map``: ``{"AutoModelForCausalLM": "modeling_shear_pruned.Shear<StockClass>"}``;
* ``shear_layout``: what differs from the stock model built from the config:
  ``params`` (name -> shape), ``attrs`` (``module.path.attribute`` -> value; ``.config.`` in the
  path gives that module its own config copy), ``modules`` (path -> ``{"type": "Dropped", ...}`` or
  ``{"type": "Identity"}``).

``Shear<StockClass>`` builds the stock model, then applies the layout, so loading is
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Any stock class name works:
the class is made on first access (module ``__getattr__``).
"""
from __future__ import annotations

import copy

import torch
import transformers
from torch import nn


class Dropped(nn.Module):
    """A removed sublayer: returns zeros ``[..., out_features]`` (default: the input width).

    For attention (``returns_tuple``) it returns ``(zeros, None)`` and, given a cache, appends an
    empty (zero-head) key/value so the cache still counts the tokens of this layer.
    """

    def __init__(self, out_features: int | None = None, returns_tuple: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.out_features, self.returns_tuple, self.layer_idx = out_features, returns_tuple, layer_idx

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        width = x.shape[-1] if self.out_features is None else self.out_features
        out = x.new_zeros(*x.shape[:-1], width)
        if not self.returns_tuple:
            return out
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            empty = x.new_zeros(x.shape[0], 0, x.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)
        return out, None

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, returns_tuple={self.returns_tuple}"


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Reshape a freshly built stock model to a pruned layout (see the module docstring)."""
    for path, spec in (layout.get("modules") or {}).items():
        spec = dict(spec)
        kind = spec.pop("type")
        _set_module(model, path, Dropped(**spec) if kind == "Dropped" else nn.Identity())
    for name, shape in (layout.get("params") or {}).items():
        mod_path, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_path)
        old = getattr(mod, attr)
        new = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        setattr(mod, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    for key, value in (layout.get("attrs") or {}).items():
        if ".config." in key or key.startswith("config."):
            mod_path, _, attr = key.partition("config.")
            mod = model.get_submodule(mod_path.rstrip("."))
            if mod.config is model.config:
                mod.config = copy.copy(mod.config)
            setattr(mod.config, attr, value)
        else:
            mod_path, _, attr = key.rpartition(".")
            mod = model.get_submodule(mod_path)
            setattr(mod, attr, tuple(value) if isinstance(value, list) else value)


_CLASSES: dict[str, type] = {}


def pruned_class(base: type) -> type:
    """``Shear<base>``: the stock class, reshaped by ``config.shear_layout`` after construction."""
    name = "Shear" + base.__name__
    if name not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            apply_layout(self, getattr(config, "shear_layout", None) or {})

        _CLASSES[name] = type(name, (base,), {"__init__": __init__, "__module__": __name__})
    return _CLASSES[name]


def __getattr__(name: str):
    if name.startswith("Shear") and hasattr(transformers, name[5:]):
        return pruned_class(getattr(transformers, name[5:]))
    raise AttributeError(name)
