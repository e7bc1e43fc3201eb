"""Which text calibrates a model, and how much of it, when the user names none: one resolver for every
consumer (prune, sparsify, learned-mask score init, prune-while-tuning).

Order: the command's own source (``importance.source`` / ``sparsify.source``), else the recipe's
``data`` section, else the text shear trained the model on (``data.source`` in the
``shear_recipe.yaml`` beside its weights, followed through ``model.path`` of the exports made from
it), else general English (``english``: the standard library's docstrings). A pretrained model from
elsewhere is therefore calibrated on English prose, never on Shakespeare: on SmolLM2-135M, 32 x 128
Shakespeare tokens made the same 20% plan 3x worse on English than English calibration did
(docs/BENCHMARKS.md). Sizes left unset: 128 x 512 tokens (capped at the model's positions), or the
reference models' 32 x 128 when the text is the shipped Shakespeare corpus they were trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("shear")

DEFAULT_SIZE = (128, 512)  #: samples x tokens for pretrained models (Wanda / SparseGPT use 128 x 2048)
SHIPPED_CORPUS_SIZE = (32, 128)  #: the reference models' calibration (their tables were made with it)


@dataclass
class Calibration:
    """A resolved calibration: ``data`` (a whole data section) or ``source``, the size, and a line naming it."""

    source: str | list[str]
    data: object | None
    n_samples: int
    seq_len: int
    what: str


def _recipe_source(path: str | None, depth: int = 0) -> str | None:
    """``data.source`` of the recipe that made the model at ``path`` (following ``model.path``), if usable."""
    if not path or depth > 4:
        return None
    import yaml

    from shear.models import resolve_model_path

    try:
        d = Path(resolve_model_path(str(path)))
    except (FileNotFoundError, ValueError):
        return None
    f = d / "shear_recipe.yaml"
    if not f.is_file():
        return None
    try:
        recipe = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError:
        return None
    src = (recipe.get("data") or {}).get("source")
    from shear.data.text import BUILTIN_SOURCES

    if isinstance(src, str) and (src in BUILTIN_SOURCES or Path(src).expanduser().exists()):
        return src
    parent = (recipe.get("model") or {}).get("path")
    return None if parent in (None, str(path)) else _recipe_source(parent, depth + 1)


def max_positions(model) -> int | None:
    c = getattr(model, "config", None)
    n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return int(n) if n else None


def check_context(model, seq_len: int, what: str) -> None:
    """Refuse windows longer than the positions the model was built for (``max_position_embeddings``)."""
    limit = max_positions(model)
    if limit and seq_len > limit:
        raise ValueError(f"{what}={seq_len} exceeds the model's max_position_embeddings={limit}")


def resolve_calibration(model, source=None, data=None, n_samples: int | None = None, seq_len: int | None = None,
                        key: str = "importance.source") -> Calibration:
    """The calibration of ``model`` (see the module docstring); ``key`` names the setting in the log line."""
    if source is not None:
        src, dcfg, what = source, None, f"{key}={source}"
    elif data is not None:
        src, dcfg, what = data.source, data, f"data.source={data.source}"
    else:
        trained = _recipe_source(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None))
        if trained is not None:
            src, dcfg, what = trained, None, f"the text shear trained this model on ({trained}; shear_recipe.yaml)"
        else:
            src, dcfg, what = "english", None, (f"general English (the standard library's docstrings; no {key} or "
                                                "data section)")
    size = SHIPPED_CORPUS_SIZE if src == "shakespeare" else DEFAULT_SIZE
    n = n_samples if n_samples is not None else size[0]
    length = seq_len
    if length is None:
        length = size[1]
        cap = max_positions(model)
        if cap:
            length = min(length, cap)
    return Calibration(src, dcfg, n, length, what)


def calibration_for(model, tokenizer, source=None, data=None, n_samples: int | None = None,
                    seq_len: int | None = None, seed: int = 0, key: str = "importance.source") -> tuple[torch.Tensor, str]:
    """Seeded calibration ids ``[n, L]`` and the line naming them (also logged)."""
    from shear.data.text import calibration_ids, calibration_scope

    c = resolve_calibration(model, source, data, n_samples, seq_len, key)
    if seq_len is not None:
        check_context(model, seq_len, key.split(".")[0] + ".seq_len")
    ids = calibration_ids(tokenizer, c.n_samples, c.seq_len, seed, source=c.source, data=c.data)
    line = (f"{ids.shape[0]} x {ids.shape[1]} tokens from {c.what}, {calibration_scope(c.source, c.data)}, "
            f"tokenizer {type(tokenizer).__name__}")
    log.info("calibration: %s", line)
    return ids, line
