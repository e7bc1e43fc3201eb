"""The two on-disk forms of a sparsified model, and reading the compressed one back.

- ``OUT/model``: dense safetensors with the zeros in place (``shear.prune.export.export``: the stock
  class, so plain ``from_pretrained`` loads it) — how sparse models are shared today.
- ``OUT/compressed``: the compressed-tensors format vLLM serves sparse models from, written by the
  ``compressed-tensors`` library (``ModelCompressor``): ``sparse-24-bitmask`` (the 2:4 layout: the two
  kept values of every group of four plus a bitmask) for 2:4, ``sparse-bitmask`` (non-zero values,
  a packed bitmask and row offsets) otherwise. ``config.json`` carries ``quantization_config`` with the
  ``sparsity_config``; ``load_compressed`` rebuilds the dense model with the library's decompressor.

compressed-tensors 0.13 is the last release that writes sparse formats and accepts transformers 5
(0.14 requires transformers < 5; 0.15 and later removed sparse compression). Targets are written as
llm-compressor writes them: ``["Linear"]`` with every Linear that was not pruned in ``ignore``. GPT-2's
Conv1D weights (``[in, out]``) are named as extra targets for the bitmask format (layout-agnostic); the
2:4 format groups along the stored rows, so there they stay dense (a warning names them).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from shear.storage import MAX_SHARD_SIZE

log = logging.getLogger("shear")


def bytes_on_disk(path: str | os.PathLike) -> dict:
    """``{"weights": bytes of *.safetensors, "total": bytes of every file}`` under ``path``."""
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return {"weights": sum(f.stat().st_size for f in files if f.suffix == ".safetensors"),
            "total": sum(f.stat().st_size for f in files)}


def _compression_config(model: nn.Module, pruned: list[str], nm: tuple[int, int] | None):
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    pruned_set = set(pruned)
    mods = dict(model.named_modules())
    ignore = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n not in pruned_set]
    conv = [n for n in pruned if not isinstance(mods[n], nn.Linear)]
    two_four = nm == (2, 4)
    if conv and two_four:
        log.warning("compressed export: %d Conv1D weights stored [in, out] stay dense in the 2:4 format "
                    "(its groups run along the stored rows): %s", len(conv), ", ".join(conv[:4]))
    zeros = sum(int((mods[n].weight == 0).sum()) for n in pruned)
    numel = sum(mods[n].weight.numel() for n in pruned)
    kw = dict(targets=["Linear"] + ([] if two_four else conv), ignore=ignore,
              global_sparsity=round(zeros / max(numel, 1), 6))
    if two_four:
        return Sparse24BitMaskConfig(**kw), conv
    return BitmaskConfig(sparsity_structure=f"{nm[0]}:{nm[1]}" if nm else "unstructured", **kw), []


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, pruned: list[str], nm: tuple[int, int] | None = None,
                    tokenizer=None, recipe: dict | None = None, overwrite: bool = False,
                    max_shard_size: int | str = MAX_SHARD_SIZE) -> dict:
    """Write ``model`` to ``out_dir`` in the compressed-tensors format; return ``{"dir", "format", "dense"}``
    (``dense``: pruned modules the format keeps dense). Values are stored in the weights' dtype (cast the
    model first, :func:`shear.models.cast_weights_`, to choose it), sharded like the dense export. Same
    directory rules as the dense export: a temporary sibling first, a manifest, and only shear's own
    earlier export is ever replaced."""
    from shear.prune.export import _check_target, move_in, remove_staged

    out = Path(out_dir).expanduser().resolve()
    _check_target(model, out, overwrite, ())
    tmp, info = stage_compressed(model, out, pruned, nm, tokenizer, recipe, max_shard_size)
    try:
        move_in([(tmp, out)])
    finally:
        remove_staged([tmp])
    return info


def stage_compressed(model: nn.Module, out: Path, pruned: list[str], nm: tuple[int, int] | None = None,
                     tokenizer=None, recipe: dict | None = None,
                     max_shard_size: int | str = MAX_SHARD_SIZE) -> tuple[Path, dict]:
    """The compressed form written to a sealed staging directory beside ``out``: ``(it, info)`` (see
    :func:`save_compressed`); ``shear.prune.export.move_in`` publishes it."""
    import shutil

    from compressed_tensors import ModelCompressor

    from shear.prune.export import save_model_files, seal, staging_dir

    cfg, dense = _compression_config(model, pruned, nm)
    compressor = ModelCompressor(sparsity_config=cfg)
    state = compressor.compress(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        save_model_files(model, tmp, max_shard_size, state_dict=state)  # a per-layer model keeps its layout
        compressor.update_config(str(tmp))
        seal(tmp, tokenizer, recipe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, {"dir": str(out), "format": cfg.format, "dense": dense}


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the dense model of a compressed-tensors directory with the library's decompressor.

    The compressed form of a per-layer pruned export carries shear's modeling file (``auto_map``): it is
    rebuilt only with ``trust_remote_code=True`` (the user's consent), else refused in one line.
    Returns ``(model in eval mode, {"missing_keys", "unexpected_keys"})``; tied weights (the LM head of a
    model with ``tie_word_embeddings``) are not reported missing.
    """
    import transformers
    from compressed_tensors import ModelCompressor

    from shear.models import CONSENT, read_json

    path = str(Path(path).expanduser())
    remote = "auto_map" in read_json(Path(path) / "config.json")
    if remote and not trust_remote_code:
        raise ValueError(f"{path}: a per-layer pruned export (config.json auto_map names its modeling code); {CONSENT}")
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=remote)
    compressor = ModelCompressor.from_pretrained(path, trust_remote_code=remote)
    if compressor is None or compressor.sparsity_compressor is None:
        raise ValueError(f"{path}: config.json has no compressed-tensors sparsity_config")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    saved = getattr(config, "dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    if remote:  # the class named in auto_map, from the directory's own modeling file
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True,
                                                              dtype=dtype or saved or torch.float32)
    else:
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            raise ValueError(f"{path}: unknown architecture {config.architectures}")
        model = cls._from_config(config, dtype=dtype or saved or torch.float32)
    state = dict(compressor.sparsity_compressor.decompress(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    ptr = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    sd = model.state_dict()
    missing = [k for k in missing if sd[k].data_ptr() not in ptr]
    return model.eval(), {"missing_keys": missing, "unexpected_keys": list(unexpected)}
