"""Export a pruned model as a directory ``from_pretrained`` loads, atomically.

The pruned model is compared with the stock model that its (updated) config builds, on the meta
device: parameter shapes, replaced modules and the simple attributes forward reads. No difference
means the stock architecture expresses it (uniform widths): a plain ``save_pretrained`` directory,
loadable without ``trust_remote_code``. Otherwise the differences are written to
``config.shear_layout`` with ``auto_map`` to ``modeling_shear_pruned.py`` (copied beside the
weights), which rebuilds the same shapes: ``from_pretrained(dir, trust_remote_code=True)``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from shear.prune import modeling_pruned

MODELING_FILE = "modeling_shear_pruned.py"
_SIMPLE = (int, float, bool, str, type(None))
_SKIP_ATTRS = {"training"}
_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size", "head_dim")


def stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly ``Shear``-wrapped) model is built from."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise ValueError(f"{type(model).__name__}: not a transformers model")


def _simple(v) -> bool:
    return isinstance(v, _SIMPLE) or (isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v))


def _attr_diffs(path: str, mod: nn.Module, ref: nn.Module, root_cfg) -> dict:
    out = {}
    for k, v in vars(mod).items():
        if k.startswith("_") or k in _SKIP_ATTRS or not _simple(v):
            continue
        rv = getattr(ref, k, None)
        if (list(v) if isinstance(v, tuple) else v) != (list(rv) if isinstance(rv, tuple) else rv):
            out[f"{path}.{k}" if path else k] = list(v) if isinstance(v, tuple) else v
    own = getattr(mod, "config", None)
    if own is not None and own is not root_cfg and hasattr(own, "to_dict"):
        for k in _CONFIG_KEYS:
            if getattr(own, k, None) != getattr(root_cfg, k, None):
                out[f"{path}.config.{k}"] = getattr(own, k)
    return out


def _build_stock(model: nn.Module, cfg) -> nn.Module:
    getattr(cfg, "validate", lambda: None)()
    with torch.device("meta"):
        return stock_class(model)(cfg)


def stock_reference(model: nn.Module):
    """(stock model its config builds on meta, overrides of ``model.config`` the export writes).

    transformers 5.x rejects ``hidden_size % num_attention_heads != 0`` for Llama/Gemma2 (config
    validation) and GPT-2/OPT/BERT (``head_dim = hidden // heads``). Such a pruned model is written
    with 1 head at top level; its real head counts go to ``shear_layout`` (and ``shear_layers``).
    """
    cfg = copy.deepcopy(model.config)
    cfg.__class__ = stock_class(model).config_class  # a reloaded per-layer export has Shear<Config>
    for k in ("shear_layout", "auto_map"):
        if hasattr(cfg, k):
            delattr(cfg, k)
    try:
        return _build_stock(model, cfg), {}
    except Exception as e:  # noqa: BLE001 - huggingface_hub wraps the ValueError
        keys = ("num_attention_heads", "num_key_value_heads", "n_head")
        overrides = {k: 1 for k in keys if isinstance(getattr(cfg, k, None), int)}
        for k, v in overrides.items():
            setattr(cfg, k, v)
        try:
            return _build_stock(model, cfg), overrides
        except Exception:  # noqa: BLE001
            raise ValueError(f"the pruned config is not valid for {type(cfg).__name__}: {e}") from None


def layout_of(model: nn.Module) -> dict:
    """What differs between ``model`` and the stock model its config builds (empty = stock)."""
    ref, _ = stock_reference(model)
    ref_mods = dict(ref.named_modules())
    layout: dict = {"modules": {}, "params": {}, "attrs": {}}
    for path, mod in model.named_modules():
        r = ref_mods.get(path)
        if r is None:
            continue
        if type(mod) is not type(r) and not isinstance(mod, type(r)):
            if type(mod).__name__ == "Dropped":  # also the copy loaded from an export
                layout["modules"][path] = {"type": "Dropped", "out_features": mod.out_features,
                                           "returns_tuple": mod.returns_tuple, "layer_idx": mod.layer_idx}
            elif isinstance(mod, nn.Identity):
                layout["modules"][path] = {"type": "Identity"}
            else:
                raise ValueError(f"{path}: {type(mod).__name__} where the stock model has {type(r).__name__}")
            continue
        if path in layout["modules"] or any(path.startswith(p + ".") for p in layout["modules"]):
            continue
        for name, p in mod.named_parameters(recurse=False):
            rp = getattr(r, name, None)
            if rp is None or tuple(rp.shape) != tuple(p.shape):
                layout["params"][f"{path}.{name}" if path else name] = list(p.shape)
        layout["attrs"].update(_attr_diffs(path, mod, r, model.config))
    return {k: v for k, v in layout.items() if v}


def _auto_class(model: nn.Module) -> str:
    """The Auto class whose mapping gives this model's stock class."""
    import transformers

    base = stock_class(model)
    for name in ("AutoModelForCausalLM", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"):
        try:
            if getattr(transformers, name)._model_mapping[base.config_class] is base:
                return name
        except KeyError:
            continue
    raise ValueError(f"{base.__name__}: no Auto class maps {type(model.config).__name__} to it")


def _merge_into(tmp: Path, out: Path) -> None:
    """Move the export's files into an existing non-model directory, ``config.json`` last."""
    files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")
    for f in files:
        dest = out / f.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(f, dest)


def export(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, recipe: dict | None = None,
           overwrite: bool = False) -> Path:
    """Save ``model`` (pruned by ``prune_``) to ``out_dir``: safetensors + config (+ tokenizer, recipe).

    Uniform models get the stock architecture; others get ``shear_layout`` + ``auto_map`` and the
    modeling file. Writes go to a temporary sibling directory renamed at the end, so an interrupted
    export never leaves a complete-looking ``out_dir`` (into an existing directory without a
    ``config.json``, files are moved in with ``config.json`` last). A directory that already holds a
    model is replaced only with ``overwrite=True``. Returns ``out_dir``.
    """
    out = Path(out_dir).expanduser().resolve()
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a model (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    layout = layout_of(model)
    _, overrides = stock_reference(model)
    saved = {k: getattr(model.config, k) for k in overrides}
    try:
        for k, v in overrides.items():
            setattr(model.config, k, v)
        try:
            model.save_pretrained(tmp)
        finally:
            for k, v in saved.items():
                setattr(model.config, k, v)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        stock = stock_class(model)
        base = stock.__name__
        cfg["architectures"] = [base]
        cfg["model_type"] = stock.config_class.model_type
        cfg.pop("auto_map", None)
        cfg.pop("shear_layout", None)
        for f in tmp.glob("*.py"):  # a re-exported model may carry an older copy
            f.unlink()
        if layout:  # a model_type of its own: without the modeling file it must not load at all
            cfg["shear_layout"] = layout
            cfg["model_type"] = modeling_pruned.PREFIX + cfg["model_type"]
            mod = MODELING_FILE[:-3]
            cfg["auto_map"] = {"AutoConfig": f"{mod}.Shear{stock.config_class.__name__}",
                               _auto_class(model): f"{mod}.Shear{base}"}
            shutil.copyfile(modeling_pruned.__file__, tmp / MODELING_FILE)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            import yaml

            (tmp / "shear_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if out.exists() and not (out / "config.json").exists():  # e.g. a run directory with reports
            _merge_into(tmp, out)
        elif out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
