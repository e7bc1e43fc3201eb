"""Modeling code for pruned models whose shapes the stock config cannot express.

This file is copied verbatim beside the weights of such exports (per-layer head counts or MLP
widths, dropped attention/MLP sublayers, GPT-2/OPT heads that no longer multiply to the hidden
size, compensation biases the stock class has no slot for). It depends on torch and transformers
only. ``config.json`` has ``model_type = "shear_<stock model_type>"`` (so that loading it without
this file fails by name instead of silently re-initialising mismatched weights) and adds:

* ``auto_map``: ``{"AutoConfig": "modeling_shear_pruned.Shear<StockConfig>",
  "AutoModelForCausalLM": "modeling_shear_pruned.Shear<StockClass>"}``;
* ``shear_layout``: what differs from the stock model built from the config:
  ``params`` (name -> shape), ``attrs`` (``module.path.attribute`` -> value; ``.config.`` in the
  path gives that module its own config copy), ``modules`` (path -> ``{"type": "Dropped", ...}`` or
  ``{"type": "Identity"}``).

``Shear<StockClass>`` builds the stock model, then applies the layout, so loading is
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Any stock class name works:
the classes are made on first access (module ``__getattr__``).
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
        like = getattr(mod, attr, None)
        if like is None:  # a bias the stock class does not build (bias compensation)
            like = mod.weight
        new = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
        setattr(mod, attr, nn.Parameter(new, requires_grad=like.requires_grad))
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
PREFIX = "shear_"


def pruned_config_class(base: type) -> type:
    """``Shear<base>``: the stock config class under ``model_type = "shear_<stock model_type>"``."""
    name = "Shear" + base.__name__
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (base,), {"model_type": PREFIX + base.model_type, "__module__": __name__})
    return _CLASSES[name]


def pruned_class(base: type) -> type:
    """``Shear<base>``: the stock class, reshaped by ``config.shear_layout`` after construction."""
    name = "Shear" + base.__name__
    if name not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            apply_layout(self, getattr(config, "shear_layout", None) or {})

        _CLASSES[name] = type(name, (base,), {"__init__": __init__, "__module__": __name__,
                                              "config_class": pruned_config_class(base.config_class)})
    return _CLASSES[name]


def is_wrapper(cls: type) -> bool:
    """A ``Shear<base>`` class made here (also from the copy beside an export)."""
    return cls.__name__.startswith("Shear") and cls.__module__.rpartition(".")[2] in (
        "modeling_pruned", "modeling_shear_pruned")


def _registered(name: str) -> type | None:
    """A config or model class registered with the Auto classes (a ``model_type`` transformers does not
    ship), by class name."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = list(CONFIG_MAPPING._extra_content.values())
    for auto in ("AutoModelForCausalLM", "AutoModel", "AutoModelForMaskedLM"):
        found += list(getattr(transformers, auto)._model_mapping._extra_content.values())
    return next((c for c in found if isinstance(c, type) and c.__name__ == name), None)


def __getattr__(name: str):
    base = (getattr(transformers, name[5:], None) or _registered(name[5:])) if name.startswith("Shear") else None
    if isinstance(base, type) and issubclass(base, transformers.PretrainedConfig):
        return pruned_config_class(base)
    if isinstance(base, type):
        return pruned_class(base)
    raise AttributeError(name)
