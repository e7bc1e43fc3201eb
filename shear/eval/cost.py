"""Model cost: parameter counts and multiply-accumulates (MACs) per token.

Measured from the modules, never from the config, so per-layer non-uniform widths (pruned heads or
MLP channels that differ by layer) are counted as they are.

- Linear MACs: forward hooks on every ``nn.Linear`` (and HF ``Conv1D``) during one short forward;
  a call on an input of R rows costs R * in_features * out_features MACs. Divided by the number of
  tokens this is the per-token cost, lm_head included.
- Attention MACs at context C: one token's query attends to C keys. Per attention module
  QK^T costs d_qk * C and A·V costs d_v * C, with d_qk = q_proj.out_features (all query heads
  x head_dim; GQA shares K/V but every query head still does its dot products) and
  d_v = o_proj.in_features. Reported apart: it grows with context, linear MACs do not.
"""
from __future__ import annotations

import torch
from torch import nn

_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj")


def count_params(model: nn.Module) -> dict:
    """``{"total", "embedding", "non_embedding"}`` parameter counts (shared tensors counted once).

    Embedding = the input embedding plus an untied output embedding (lm_head), the convention of
    Kaplan et al. (2020) for "non-embedding parameters".
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb: dict[int, int] = {}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None and getattr(mod, "weight", None) is not None:
            emb[id(mod.weight)] = mod.weight.numel()
    embedding = sum(emb.values())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear-like module, else None."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:  # GPT-2 style, weight [in, out]
        return tuple(mod.weight.shape)
    return None


@torch.inference_mode()
def linear_macs_per_token(model: nn.Module, n_tokens: int = 8) -> dict[str, float]:
    """MACs per token of every Linear-like module, measured by hooks on a forward of ``n_tokens``.

    Returns ``{module_name: macs_per_token}`` (modules that did not run are absent).
    """
    macs: dict[str, float] = {}
    handles = []
    for name, mod in model.named_modules():
        shape = _linear_shape(mod)
        if shape is None:
            continue

        def hook(m, inp, out, name=name, shape=shape):
            rows = inp[0].numel() // shape[0]
            macs[name] = macs.get(name, 0) + rows * shape[0] * shape[1]

        handles.append(mod.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.arange(n_tokens, device=device)[None] % vocab
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v / n_tokens for k, v in macs.items()}


def attention_widths(model: nn.Module) -> list[tuple[str, int, int]]:
    """``[(name, d_qk, d_v), ...]`` for every attention module (class name contains 'Attention')."""
    found = []
    for name, mod in model.named_modules():
        if "Attention" not in type(mod).__name__ or any(name.startswith(f + ".") for f, _, _ in found):
            continue
        outs = [_linear_shape(m) for n in _OUT_PROJ_NAMES if isinstance(m := getattr(mod, n, None), nn.Module)]
        outs = [s for s in outs if s is not None]
        if not outs:
            continue
        d_v = outs[0][0]
        q = getattr(mod, "q_proj", None)
        q_shape = _linear_shape(q) if isinstance(q, nn.Module) else None
        d_qk = q_shape[1] if q_shape else d_v
        found.append((name, d_qk, d_v))
    return found


def macs_per_token(model: nn.Module, seq_len: int = 256, n_tokens: int = 8) -> dict:
    """MACs per token: ``{"linear", "attention", "total", "context"}``.

    ``linear``: all Linear-like modules (hooked, see :func:`linear_macs_per_token`);
    ``attention``: QK^T and A·V of one token attending to ``seq_len`` positions, summed over layers;
    ``total`` = linear + attention. ``context`` echoes ``seq_len``.
    """
    linear = sum(linear_macs_per_token(model, n_tokens).values())
    attn = sum((d_qk + d_v) * seq_len for _, d_qk, d_v in attention_widths(model))
    return {"linear": int(round(linear)), "attention": int(attn), "total": int(round(linear)) + int(attn),
            "context": seq_len}
