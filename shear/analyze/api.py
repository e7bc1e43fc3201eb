"""``analyze(model)`` and ``analyze_path(dir)``: the public entry points of the analyzer."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from torch import nn

from shear.analyze.families import FAMILIES, family_of
from shear.analyze.graph import StructureGraph

log = logging.getLogger("shear")


def analyze(model: nn.Module, heads: str = "kv_group") -> StructureGraph:
    """The coupled groups of ``model`` (any device, ``meta`` included).

    Args:
        model: a transformers model of a supported family (``shear.analyze.families.FAMILIES``);
            other architectures go through torch-pruning's DependencyGraph (real weights only).
        heads: ``"kv_group"`` (GQA: whole KV groups; MHA: heads) or ``"query_head"`` (GQA: the j-th
            query head of every KV group, keeping every KV head; MHA: heads).
    """
    from shear.analyze.build import build_graph

    fam = family_of(model)
    if fam is not None:
        return build_graph(model, fam, heads)
    from shear.analyze.fallback import analyze_with_torch_pruning

    return analyze_with_torch_pruning(model, heads)


def meta_model(path: str | Path, trust_remote_code: bool = False):
    """Build the model of a directory holding (at least) ``config.json`` on the meta device.

    A directory with its own modeling code (``auto_map``) is built only with ``trust_remote_code``
    (the user's consent); otherwise that is an error naming the directory.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from shear.models import check_remote_code

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json")
    check_remote_code(str(path), trust_remote_code)
    remote = trust_remote_code
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=remote)
        except ValueError:  # encoders (BERT) have no causal-LM class
            return AutoModel.from_config(cfg, trust_remote_code=remote)


def weight_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, file) from the headers of ``path``'s safetensors files (8 bytes of header
    length + the JSON header; no tensor data read). Unreadable headers are skipped (analyze needs no weights)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (ValueError, OSError, MemoryError):
            log.warning("%s: header not readable; config.json not checked against it", f)
            continue
        out.update({k: (tuple(v["shape"]), f.name) for k, v in header.items() if k != "__metadata__"})
    return out


def _layer_count(names) -> int:
    return len({m.group(1) for n in names if (m := re.search(r"\.(\d+)\.", n))})


def check_config_sizes(path: Path, model) -> None:
    """Warn when config.json lacks size keys (transformers' defaults are assumed); refuse a config whose
    shapes disagree with the safetensors beside it, naming the tensor and the keys to set."""
    from shear.models import missing_size_keys

    missing = missing_size_keys(path, model.config)
    fix = (f"config.json has no {', '.join(missing)}, so transformers' defaults were assumed; set them"
           if missing else "config.json does not describe these weights; fix it")
    shapes = weight_shapes(path)
    ours = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    common = [n for n in shapes if n in ours]
    for n in common:
        if shapes[n][0] != ours[n]:
            raise ValueError(f"{path / 'config.json'} disagrees with {shapes[n][1]}: {n} is {list(shapes[n][0])} "
                             f"there but {list(ours[n])} by the config; {fix}")
    if common and _layer_count(common) != _layer_count(ours):
        raise ValueError(f"{path / 'config.json'} gives {_layer_count(ours)} layers but the weights hold "
                         f"{_layer_count(common)}; {fix}")
    if missing:
        used = ", ".join(f"{k}={getattr(model.config, k)}" for k in missing)
        log.warning("%s has no %s: transformers' defaults are assumed (%s); the sizes reported are those "
                    "defaults', not necessarily the model's", path / "config.json", ", ".join(missing), used)


def analyze_path(path: str | Path, heads: str = "kv_group", trust_remote_code: bool = False) -> StructureGraph:
    """Analyze the model of a directory without loading weights (only ``config.json`` and the headers of
    its safetensors files, when present, are read: :func:`check_config_sizes`)."""
    model = meta_model(path, trust_remote_code)
    check_config_sizes(Path(path), model)
    if family_of(model) is None:
        raise ValueError(f"{path}: model_type {model.config.model_type!r} is not one of the families analyzed "
                         f"on the meta device ({sorted(FAMILIES)}); load it with weights to use the "
                         "torch-pruning fallback")
    return analyze(model, heads)
