"""``analyze(model)`` and ``analyze_path(dir)``: the public entry points of the analyzer."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from shear.analyze.families import FAMILIES, family_of
from shear.analyze.graph import StructureGraph
from shear.models import check_config_sizes, meta_model


def analyze(model: nn.Module, heads: str = "kv_group") -> StructureGraph:
    """The coupled groups of ``model`` (any device, ``meta`` included).

    Args:
        model: a transformers model of a supported family (``shear.analyze.families.FAMILIES``, or an
            unlisted ``model_type`` whose modules fit the llama template: ``shear.analyze.structure``);
            other architectures go through torch-pruning's DependencyGraph (real weights only).
        heads: ``"kv_group"`` (GQA: whole KV groups; MHA: heads) or ``"query_head"`` (GQA: the j-th
            query head of every KV group, keeping every KV head; MHA: heads).
    """
    from shear.analyze.build import build_graph

    fam = family_of(model)
    if fam is not None:
        return build_graph(model, fam, heads)
    from shear.analyze.fallback import analyze_with_torch_pruning

    graph = analyze_with_torch_pruning(model, heads)
    graph.meta["misfit"] = misfit(model)
    return graph


def misfit(model: nn.Module) -> str:
    """Why a model of an unlisted ``model_type`` is not analyzed as llama: the first module that does not fit."""
    from shear.analyze.structure import match_llama

    return match_llama(model, FAMILIES["llama"])[1]


def analyze_path(path: str | Path, heads: str = "kv_group", trust_remote_code: bool = False) -> StructureGraph:
    """Analyze the model of a directory without loading weights (only ``config.json`` and the headers of
    its safetensors files, when present, are read: :func:`check_config_sizes`)."""
    model = meta_model(path, trust_remote_code)
    check_config_sizes(Path(path), model)
    if family_of(model) is None:
        raise ValueError(f"{path}: model_type {model.config.model_type!r} is not one of the families analyzed "
                         f"on the meta device ({sorted(FAMILIES)}) nor Llama-shaped ({misfit(model)}); load it "
                         "with weights to use the torch-pruning fallback")
    return analyze(model, heads)
