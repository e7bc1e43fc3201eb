"""Export a pruned model as a directory ``from_pretrained`` loads, atomically.

The pruned model is compared with the stock model that its (updated) config builds, on the meta
device: parameter shapes, replaced modules and the simple attributes forward reads. No difference
means the stock architecture expresses it (uniform widths): a plain ``save_pretrained`` directory,
loadable without ``trust_remote_code``. Otherwise the differences are written to
``config.shear_layout`` with ``auto_map`` to ``modeling_shear_pruned.py`` (copied beside the
weights), which rebuilds the same shapes: ``from_pretrained(dir, trust_remote_code=True)``.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from shear.models import cast_weights_
from shear.storage import MAX_SHARD_SIZE
from shear.prune import modeling_pruned

log = logging.getLogger("shear")

MODELING_FILE = "modeling_shear_pruned.py"
_SIMPLE = (int, float, bool, str, type(None))
_SKIP_ATTRS = {"training"}
_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size", "head_dim")


def stock_class(model: nn.Module) -> type:
    """The class an export names, for a (possibly ``Shear``-wrapped) model: the first of its classes that an
    Auto class maps its config to (a ``model_type`` registered with the Auto classes keeps its own class),
    else the first transformers class."""
    import transformers

    from shear.models import AUTO_CLASSES

    mro = [c for c in type(model).__mro__ if not modeling_pruned.is_wrapper(c)]
    for cls in mro:
        for auto in AUTO_CLASSES:
            try:
                if getattr(transformers, auto)._model_mapping[cls.config_class] is cls:
                    return cls
            except (KeyError, AttributeError):
                continue
    for cls in mro:
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


MANIFEST = "shear_export.json"


def _written_by_shear(out: Path) -> list[str]:
    """Files a previous export listed in ``out/shear_export.json`` (empty: none, or not shear's)."""
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f for f in files if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")]


def _input_dirs(model: nn.Module) -> list[Path]:
    """Local directories the model was loaded from (``from_pretrained`` records them)."""
    out = []
    for v in (getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)):
        if v and Path(str(v)).expanduser().is_dir():
            out.append(Path(str(v)).expanduser().resolve())
    return out


ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _st_root(src: Path) -> tuple[Path, str] | None:
    """(sentence-transformers root, the transformer's path in it) for a directory the model was loaded
    from: the directory itself (modern layout, path "") or its parent when that names it as the
    Transformer module (``0_Transformer/``)."""
    if (src / "modules.json").is_file():
        return src, ""
    parent = src.parent / "modules.json"
    if parent.is_file():
        from shear.models import ST_TRANSFORMER

        if any(m.get("type") == ST_TRANSFORMER and str(m.get("path", "")) == src.name
               for m in json.loads(parent.read_text())):
            return src.parent, src.name
    return None


def _copy_sentence_transformers(model: nn.Module, tmp: Path) -> None:
    """Keep a sentence-transformers directory usable: when the model was loaded from one (``modules.json``
    beside the transformer files, or above them in ``0_Transformer/``), copy its module list and the
    modules stored in subdirectories (``1_Pooling/``, ``2_Normalize/``...) beside the pruned transformer.
    The transformer module itself is the export, at the top (path ``""``: the modern layout)."""
    for src in _input_dirs(model):
        found = _st_root(src)
        if found is None:
            continue
        root, own = found
        for d in (root, src):  # the older layout keeps sentence_bert_config.json with the transformer
            for name in ST_FILES:
                if (d / name).is_file():
                    shutil.copyfile(d / name, tmp / name)
        mods = json.loads((root / "modules.json").read_text())
        for mod in mods:
            sub = str(mod.get("path", ""))
            if sub == own:
                mod["path"] = ""
            elif sub and "/" not in sub and sub not in (".", "..") and (root / sub).is_dir():
                shutil.copytree(root / sub, tmp / sub, dirs_exist_ok=True)
                cfg = tmp / sub / "config.json"  # Pooling records the width it pools (hidden may be pruned)
                d = json.loads(cfg.read_text()) if cfg.is_file() else {}
                if "word_embedding_dimension" in d:
                    d["word_embedding_dimension"] = model.config.hidden_size
                    cfg.write_text(json.dumps(d, indent=2) + "\n")
        (tmp / "modules.json").write_text(json.dumps(mods, indent=2) + "\n")
        return


def _check_target(model: nn.Module | None, out: Path, overwrite: bool, protect) -> None:
    """Refuse targets whose replacement could lose what shear did not write (see :func:`export`); ``model``
    None: the source directories are only those in ``protect``."""
    for src in (_input_dirs(model) if model is not None else []) + [Path(p).expanduser().resolve() for p in protect]:
        if out == src:
            raise FileExistsError(f"{out} is the directory the model was loaded from; export elsewhere")
    if not (out / "config.json").exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already holds a model (pass overwrite=True to replace it)")
    if not _written_by_shear(out):
        raise FileExistsError(f"{out} holds a model that shear did not export (no {MANIFEST}); it is not "
                              "replaced — export elsewhere or remove it yourself")


def staging_dir(out: Path) -> Path:
    """Where an export to ``out`` is written before it is published: the hidden sibling ``.NAME.tmp-XXXXXXXX``."""
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


STAGING = re.compile(r"\..+\.tmp-[0-9a-f]{8}")  # the names staging_dir gives


def remove_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Delete the staging directories an interrupted export left for ``out`` (beside it, and beside what is in
    it: ``OUT/.model.tmp-XXXXXXXX``), saying so; only names :func:`staging_dir` gives. Returns them."""
    out = Path(out).expanduser()
    found = [p for p in out.parent.glob(f".{glob.escape(out.name)}.tmp-*") if STAGING.fullmatch(p.name)]
    if out.is_dir():
        found += [p for p in sorted(out.iterdir()) if STAGING.fullmatch(p.name)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if found:
        log.warning("%s: removed %s, left by an interrupted export", out, ", ".join(p.name for p in found))
    return found


def _check_clash(tmp: Path, out: Path) -> None:
    new = {f.name for f in tmp.iterdir()}
    old = _written_by_shear(out)
    clash = sorted(f.name for f in out.iterdir() if f.name in new and f.name not in old)
    if clash:
        raise FileExistsError(f"{out} has files shear did not write where the export goes ({', '.join(clash[:4])}); "
                              "not replaced — export elsewhere")


def _remove(f: Path) -> None:
    if f.is_file() or f.is_symlink():
        f.unlink()
    elif f.is_dir():  # a sentence-transformers module shear copied (1_Pooling/...)
        shutil.rmtree(f)


def stage_file(dest: Path, text: str, staged: list) -> list[tuple[Path, Path]]:
    """``text`` written to a staging file beside ``dest`` (appended to ``staged``); returns the ``files``
    entry of :func:`move_in` that publishes it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(dest)
    staged.append(tmp)
    tmp.write_text(text)
    return [(tmp, dest)]


def publish_prune(stage: Path, out: Path, report: dict) -> None:
    """Move a prune staged in ``stage`` into ``out``: the model, then the plot, plans and report (last);
    nothing else there is touched. ``report``'s paths are rewritten to their places in ``out``."""
    for k, name in (("plot", "kept_widths.png"), ("model_dir", "model")):
        if k in report:
            report[k] = str(out / name)
    (stage / "report.json").write_text(json.dumps(report, indent=2, default=str))
    out.mkdir(parents=True, exist_ok=True)
    exported = (stage / "model").exists()  # --no-export: shear's earlier model would not match the new report
    names = sorted((f.name for f in stage.iterdir() if f.is_file()), key=lambda n: n == "report.json")
    move_in([(stage / "model", out / "model")] if exported else [], [(stage / n, out / n) for n in names],
            drop=[] if exported else [out / "model"])


def remove_staged(staged: list[Path]) -> None:
    """Remove what is left of staged forms and files (after :func:`move_in`, or after a failure)."""
    for tmp in staged:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def move_in(forms: list[tuple[Path, Path]], files: list[tuple[Path, Path]] = (), drop: list[Path] = ()) -> None:
    """Publish staged exports (``forms``: (staged directory, target)) and report files (``files``: (staged file,
    target)) together; in a target that exists only the previous export's files are replaced, nothing else.
    ``drop``: earlier exports of forms the new output does not have (their manifest's files go).

    Every target is checked before anything moves. Then every old ``config.json`` and target file goes, the
    new files come in, each form's ``config.json`` (or the whole staged directory, renamed onto a target that
    does not exist) after them and the report files last: an interruption leaves forms that do not load or
    no report, never one run's form beside another run's.
    """
    for tmp, out in forms:
        if out.exists():
            _check_clash(tmp, out)
    for tmp, out in forms:
        _remove(out / "config.json")
    for _, dest in files:
        _remove(dest)
    for out in drop:
        for name in _written_by_shear(out):
            _remove(out / name)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    for tmp, out in forms:
        if out.exists():
            for name in _written_by_shear(out):
                _remove(out / name)
            for f in tmp.iterdir():
                if f.name != "config.json":
                    os.replace(f, out / f.name)
    for tmp, out in forms:
        if out.exists():
            os.replace(tmp / "config.json", out / "config.json")
        else:
            tmp.rename(out)
    for staged, dest in files:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)


def seal(tmp: Path, tokenizer=None, recipe: dict | None = None) -> None:
    """Finish an export written to ``tmp``: tokenizer, recipe, and the manifest of every file."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if recipe is not None:
        import yaml

        (tmp / "shear_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    files = sorted(f.name for f in tmp.iterdir()) + [MANIFEST]
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def export(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, recipe: dict | None = None,
           overwrite: bool = False, protect: tuple = (), dtype: str | None = None,
           max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Save ``model`` (pruned by ``prune_``) to ``out_dir``: safetensors + config (+ tokenizer, recipe).

    ``dtype`` (``fp32``/``bf16``/``fp16``; None: as they are) casts the weights first, in place
    (:func:`shear.models.cast_weights_`: the model in memory is the model written); ``config.json``
    records it. Weights over ``max_shard_size`` are split into shards with ``model.safetensors.index.json``
    (``save_pretrained``'s sharding; 5GB by default, as on the hub).

    Uniform models get the stock architecture; others get ``shear_layout`` + ``auto_map`` (under the
    Auto class of the model's own class: ``AutoModel`` for ``BertModel``) and the modeling file. A
    model loaded from a sentence-transformers directory keeps its pooling/normalize modules beside it.
    Writes go to a temporary sibling directory first, so an interrupted export never
    leaves a complete-looking ``out_dir``; ``shear_export.json`` lists the files written.

    Nothing shear did not write is deleted: into an existing directory the files are moved in beside
    what is there (a run directory keeps its reports and checkpoints); a directory that already holds
    a model is replaced only with ``overwrite=True``, only if shear exported it (its manifest), and
    then only the files the manifest lists are replaced. The directory the model was loaded from
    (and any path in ``protect``) is never a target, nor a directory containing it. Returns ``out_dir``.
    """
    out = Path(out_dir).expanduser().resolve()
    _check_target(model, out, overwrite, protect)
    cast_weights_(model, dtype)
    tmp = stage_export(model, out, tokenizer, recipe, max_shard_size=max_shard_size)
    try:
        move_in([(tmp, out)])
    finally:
        remove_staged([tmp])
    return out


def stage_export(model: nn.Module, out: Path, tokenizer=None, recipe: dict | None = None,
                 max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Write the export of ``model`` (see :func:`export`; weights as they are) to a staging directory beside
    ``out``, sealed, and return it (nothing is left behind when it fails): :func:`move_in` publishes it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        save_model_files(model, tmp, max_shard_size)
        _copy_sentence_transformers(model, tmp)
        seal(tmp, tokenizer, recipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def save_model_files(model: nn.Module, tmp: Path, max_shard_size: int | str = MAX_SHARD_SIZE,
                     state_dict: dict | None = None) -> None:
    """``save_pretrained`` into ``tmp`` with the config an export needs: the stock architecture for uniform
    widths, else ``shear_layout`` + ``auto_map`` and shear's modeling file (a model_type of its own, so
    that without the file it does not load at all). ``state_dict``: what to write instead of the model's
    own (the compressed-tensors form)."""
    layout = layout_of(model)
    with stock_overrides(model):
        # a per-layer export loads through its own class, which transformers gives no checkpoint
        # conversion: its keys stay the module names (GPT-NeoX's lm_head, not the legacy embed_out)
        model.save_pretrained(tmp, max_shard_size=max_shard_size, state_dict=state_dict,
                              save_original_format=not layout)
    finish_config(model, tmp, layout)


@contextlib.contextmanager
def stock_overrides(model: nn.Module):
    """``model.config`` with the overrides :func:`stock_reference` needs (1 head at top level where the stock
    config rejects the pruned head count) for as long as the block runs: what ``config.json`` is written with."""
    _, overrides = stock_reference(model)
    saved = {k: getattr(model.config, k) for k in overrides}
    for k, v in overrides.items():
        setattr(model.config, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)


def finish_config(model: nn.Module, tmp: Path, layout: dict) -> None:
    """Rewrite the ``config.json`` written into ``tmp`` for ``model``'s export: the stock class and model type,
    and for a per-layer ``layout`` (:func:`layout_of`) ``shear_layout``, ``auto_map`` and shear's modeling file."""
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
    if layout:
        cfg["shear_layout"] = layout
        cfg["model_type"] = modeling_pruned.PREFIX + cfg["model_type"]
        mod = MODELING_FILE[:-3]
        cfg["auto_map"] = {"AutoConfig": f"{mod}.Shear{stock.config_class.__name__}",
                           _auto_class(model): f"{mod}.Shear{base}"}
        shutil.copyfile(modeling_pruned.__file__, tmp / MODELING_FILE)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
