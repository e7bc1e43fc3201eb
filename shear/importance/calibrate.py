"""Streaming block-by-block calibration for activation criteria (glue: hooks and loops).

The model runs up to its first decoder block once per batch (the block's inputs and keyword
arguments, e.g. rotary embeddings and the causal mask, are caught by a pre-hook). Then each
block in turn runs on the stored inputs with hooks that accumulate per-channel statistics of
every Linear's input; its outputs replace its inputs. Peak memory = the weights + one block's
inputs/outputs for the calibration set (``n_samples x seq_len x hidden``) + one batch's
intermediates. Blocks may sit on different devices (``device_map``): inputs follow the block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from shear.importance.criteria import cosine_tokens
from shear.models import check_finite


@dataclass
class LinearStats:
    """Statistics of one Linear's input ``X [tokens, in]`` over the calibration set (fp64, CPU).

    ``x_sum``/``x_sqsum``: per-channel sum and sum of squares; ``mabs_sq``: sum over samples of
    ``(mean over tokens |X_j|)^2`` (Minitron); ``n``: tokens; ``n_samples``: sequences.
    """

    x_sum: torch.Tensor
    x_sqsum: torch.Tensor
    mabs_sq: torch.Tensor
    n: int = 0
    n_samples: int = 0

    @classmethod
    def zeros(cls, d: int) -> "LinearStats":
        z = lambda: torch.zeros(d, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z())

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch ``x [B, L, in]`` (or ``[L, in]``)."""
        x = x.detach()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        xf = x.double()
        self.x_sum += xf.sum((0, 1)).cpu()
        self.x_sqsum += (xf * xf).sum((0, 1)).cpu()
        self.mabs_sq += (xf.abs().mean(1) ** 2).sum(0).cpu()
        self.n += x.shape[0] * x.shape[1]
        self.n_samples += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.x_sum / max(self.n, 1)


@dataclass
class ActivationStats:
    """What one streaming pass collects.

    ``linears``: module name -> LinearStats of its input. ``layer_cos[i]`` / ``layer_angle[i]``:
    sums over tokens of cos / arccos between block ``i``'s input and output; ``attn_cos[i]`` /
    ``mlp_cos[i]``: the same around each sublayer (input vs input + sublayer output); ``tokens``.
    """

    linears: dict[str, LinearStats] = field(default_factory=dict)
    layer_cos: dict[int, float] = field(default_factory=dict)
    layer_angle: dict[int, float] = field(default_factory=dict)
    attn_cos: dict[int, float] = field(default_factory=dict)
    attn_angle: dict[int, float] = field(default_factory=dict)
    mlp_cos: dict[int, float] = field(default_factory=dict)
    mlp_angle: dict[int, float] = field(default_factory=dict)
    tokens: int = 0


class _Stop(Exception):
    pass


def _family(model: nn.Module):
    from shear.analyze.families import family_of

    fam = family_of(model)
    if fam is None:
        raise ValueError(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}): "
                         "activation statistics need a supported family (shear.analyze.families)")
    return fam


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The blocks of a supported model (``model.model.layers`` for Llama, ``transformer.h`` for GPT-2,
    ``bert.encoder.layer`` for BERT), located through its :class:`~shear.analyze.families.Family`."""
    fam = _family(model)
    try:
        return model.base_model.get_submodule(fam.layers)
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: no blocks at {fam.layers!r} (unsupported variant of "
                         f"{fam.name})") from None


def is_matmul(mod: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2: weight ``[in, out]``); both see inputs ``[.., in]``."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> tuple[list, list]:
    """Run the model up to block 0 for each batch; return (hidden states, (extra args, kwargs)) lists."""
    layers = decoder_layers(model)
    hidden, kwargs_list = [], []

    def pre(_mod, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs_list.append((tuple(args[1:]), kw))  # BERT passes its attention mask positionally
        raise _Stop

    handle = layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        dev = model.get_input_embeddings().weight.device
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def _add_angles(store_cos: dict, store_ang: dict, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
    c = cosine_tokens(a, b).clamp(-1.0, 1.0)
    store_cos[i] = store_cos.get(i, 0.0) + float(c.sum())
    store_ang[i] = store_ang.get(i, 0.0) + float(torch.arccos(c).sum())


@torch.no_grad()
def collect_activation_stats(model: nn.Module, ids: torch.Tensor, batch_size: int = 8,
                             modules: set[str] | None = None, progress: bool = False) -> ActivationStats:
    """Stream the calibration ids ``[n, L]`` through the blocks, collecting :class:`ActivationStats`.

    ``modules``: Linear module names whose inputs to record (None = every Linear in the blocks
    and the output head).
    """
    names = {m: n for n, m in model.named_modules()}
    stats = ActivationStats()
    hidden, kws = capture_block_inputs(model, ids, batch_size)
    stats.tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
    layers = decoder_layers(model)
    it = range(len(layers))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibrating blocks")
    fam = _family(model)
    for i in it:
        layer, dev = layers[i], _device(layers[i])
        handles, mid = [], {}

        def rec(name):
            def hook(_m, inp, _out):
                x = inp[0]
                st = stats.linears.get(name)
                if st is None:
                    st = stats.linears[name] = LinearStats.zeros(x.shape[-1])
                st.add(x)
            return hook

        for mod in layer.modules():
            if is_matmul(mod) and (modules is None or names[mod] in modules):
                handles.append(mod.register_forward_hook(rec(names[mod])))
        # pre-norm blocks: the MLP's input norm sees the residual stream between the sublayers
        mid_norm = _submodule(layer, fam.mlp_norms[0]) if fam.prenorm else None
        if mid_norm is not None:
            handles.append(mid_norm.register_forward_pre_hook(lambda _m, a: mid.__setitem__("x", a[0])))
        try:
            for b in range(len(hidden)):
                x = hidden[b].to(dev)
                args, kw = kws[b]
                out = layer(x, *_to(args, dev), **_to(kw, dev))
                out = out[0] if isinstance(out, tuple) else out
                _add_angles(stats.layer_cos, stats.layer_angle, i, x, out)
                if "x" in mid:
                    m = mid["x"].reshape(x.shape)  # OPT flattens tokens before its MLP norm
                    _add_angles(stats.attn_cos, stats.attn_angle, i, x, m)
                    _add_angles(stats.mlp_cos, stats.mlp_angle, i, m, out)
                mid.clear()
                hidden[b] = out
        finally:
            for h in handles:
                h.remove()
        recorded = {names[m] for m in layer.modules() if names.get(m) in stats.linears}
        check_finite(((n, s.x_sqsum) for n, s in stats.linears.items() if n in recorded),
                     "importance: calibration statistics of the input of", STATS_FIX)
    _record_head(model, hidden, stats, names, modules)
    return stats


# What a non-finite calibration statistic means (the weights were checked finite when loaded).
STATS_FIX = ("the activations reaching it overflow or are nan: check the model's weights, or load it in fp32 "
             "(model.dtype: fp32)")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _record_head(model, hidden, stats: ActivationStats, names, modules) -> None:
    """Stats of the output head's input (the final norm's output), if the model has a head and it is wanted."""
    fam = _family(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not fam.causal or not is_matmul(head):
        return
    norm = _submodule(model.base_model, fam.final_norms[-1])
    if norm is None:
        return
    name = names[head]
    if modules is not None and name not in modules:
        return
    st = stats.linears[name] = LinearStats.zeros(hidden[0].shape[-1])
    for h in hidden:
        st.add(norm(h.to(_device(norm))))


def layer_scores(stats: ActivationStats, kind: str, metric: str) -> dict[int, float]:
    """Block influence (``metric='block_influence'``) or angular distance per layer index.

    ``kind``: ``layer``, ``attn_sublayer`` or ``mlp_sublayer``.
    """
    cos = {"layer": stats.layer_cos, "attn_sublayer": stats.attn_cos, "mlp_sublayer": stats.mlp_cos}[kind]
    ang = {"layer": stats.layer_angle, "attn_sublayer": stats.attn_angle, "mlp_sublayer": stats.mlp_angle}[kind]
    n = stats.tokens
    if metric == "block_influence":
        return {i: 1.0 - c / n for i, c in cos.items()}
    return {i: a / n / math.pi for i, a in ang.items()}
