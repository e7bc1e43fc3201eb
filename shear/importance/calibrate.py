"""Streaming block-by-block calibration for activation criteria (glue: hooks and loops).

The model runs once per batch with its blocks stubbed out: block 0's input and every block's keyword
arguments (rotary embeddings, the causal or sliding-window mask) are recorded. Then each
block in turn runs on the stored inputs with hooks that accumulate per-channel statistics of
every Linear's input; its outputs replace its inputs. Peak memory = the weights + one block's
inputs/outputs for the calibration set (``n_samples x seq_len x hidden``) + one batch's
intermediates. Blocks may sit on different devices (``device_map``): inputs follow the block.
Under a multi-process launch each rank streams its share of the batches and the sums are all-reduced
(:mod:`shear.distributed`), so every rank holds the statistics of the whole calibration set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from shear import distributed
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
    """The model's :class:`~shear.analyze.families.Family`, or None (blocks are then found by structure)."""
    from shear.analyze.families import family_of

    return family_of(model)


def structural_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the longest ``nn.ModuleList`` whose children are all one class (the decoder stack).

    Ties go to the first in module order. A model with no such list is refused with one line naming it.
    """
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(b) for b in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found (no nn.ModuleList whose children "
                         "are all the same block class)")
    return best


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The blocks of a model: a supported family's (``model.model.layers`` for Llama, ``transformer.h`` for
    GPT-2, ``bert.encoder.layer`` for BERT) through its :class:`~shear.analyze.families.Family`, any other
    model's by structure (:func:`structural_blocks`)."""
    fam = _family(model)
    if fam is None:
        return structural_blocks(model)[1]
    try:
        return model.base_model.get_submodule(fam.layers)
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: no blocks at {fam.layers!r} (unsupported variant of "
                         f"{fam.name})") from None


def blocks_path(model: nn.Module) -> str:
    """``"model.layers"``: the module path of the blocks (block ``i``'s names start ``f"{path}.{i}."``)."""
    blocks = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is blocks)


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


def _input_embeddings(model: nn.Module) -> nn.Module:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}: no input embeddings (get_input_embeddings() gives "
                         f"{type(emb).__name__}); calibration feeds token ids")
    return emb


_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> tuple[list, list]:
    """Run the model up to its blocks for each batch; return ``(hidden, kws)``.

    ``hidden[b]``: block 0's input ``[B, L, hidden]`` for batch ``b``; ``kws[i][b]``: ``(extra args,
    kwargs)`` block ``i`` is called with (attention masks, ``position_embeddings``, ``cache_position``,
    ...; never the KV cache). Per block, because models pick them per layer: Gemma 2/3 give sliding-window
    layers their own mask and (Gemma 3) their own rotary embeddings. Every block's ``forward`` is
    replaced for the pass by a stub that records its inputs and passes the hidden states through (the
    last one stops the pass), so no block computes anything; the kwargs share the model's tensors.
    """
    layers = decoder_layers(model)
    emb = _input_embeddings(model)
    hidden, kws = [], [[] for _ in layers]

    def stub(i):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states", None)
            if not torch.is_tensor(h):
                raise ValueError(f"{type(layers[i]).__name__}: block {i} is called without a hidden-states "
                                 f"tensor (first argument or hidden_states=); keywords: {sorted(kwargs)}")
            if i == 0:
                hidden.append(h.detach())
            kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
            kws[i].append((tuple(args[1:]), kw))  # BERT passes its attention mask positionally
            if i == len(layers) - 1:
                raise _Stop
            return h
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # accelerate's hooks wrap forward there
    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        for n, batch in enumerate(ids.split(batch_size), 1):
            try:
                model(input_ids=batch.to(emb.weight.device), use_cache=False)
            except _Stop:
                pass
            missed = [i for i in range(len(layers)) if len(kws[i]) != n]
            if missed:
                raise ValueError(f"{type(model).__name__}: the forward pass never called block {missed[0]} "
                                 f"({type(layers[missed[0]]).__name__}); its inputs cannot be captured")
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
    return hidden, kws


def _add_angles(store_cos: dict, store_ang: dict, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
    c = cosine_tokens(a, b).clamp(-1.0, 1.0)
    store_cos[i] = store_cos.get(i, 0.0) + float(c.sum())
    store_ang[i] = store_ang.get(i, 0.0) + float(torch.arccos(c).sum())


@torch.no_grad()
def collect_activation_stats(model: nn.Module, ids: torch.Tensor, batch_size: int = 8,
                             modules: set[str] | None = None, progress: bool = False) -> ActivationStats:
    """Stream the calibration ids ``[n, L]`` through the blocks, collecting :class:`ActivationStats`.

    ``modules``: Linear module names whose inputs to record (None = every Linear in the blocks
    and the output head). Under a process group every rank calls this with the same ``ids`` and runs
    every W-th batch; the sums are all-reduced at the end.
    """
    names = {m: n for n, m in model.named_modules()}
    stats = ActivationStats()
    n_batches = math.ceil(ids.shape[0] / batch_size)
    split = distributed.is_split(n_batches)
    if split:  # this rank's batches, still split into the same batches by capture_block_inputs
        ids = torch.cat([ids[i * batch_size:(i + 1) * batch_size] for i in distributed.my_batches(n_batches)])
    hidden, kws = capture_block_inputs(model, ids, batch_size)
    stats.tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
    layers = decoder_layers(model)
    it = range(len(layers))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibrating blocks")
    fam = _family(model)
    for i in it:
        calibrate_block(model, i, layers[i], hidden, kws, stats, names, modules, fam)
    _record_head(model, hidden, stats, names, modules)
    if split:
        _reduce(stats)
    return stats


@torch.no_grad()
def calibrate_block(model: nn.Module, i: int, layer: nn.Module, hidden: list, kws: list, stats: ActivationStats,
                    names: dict, modules: set[str] | None, fam) -> None:
    """One block of :func:`collect_activation_stats`: run block ``i`` on ``hidden`` (its inputs per batch,
    replaced by its outputs) with ``kws[i]``, adding its Linears' input statistics (``modules``; None = all)
    and its cosines / angles to ``stats``. ``names``: ``{module: name}`` of the model; ``fam``: its family."""
    dev = _device(layer)
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
    # sequential blocks: this module's input is the residual stream between the sublayers
    mid_path = fam.mid_input(model.config) if fam is not None else None
    mid_norm = _submodule(layer, mid_path) if mid_path else None
    if mid_norm is not None:
        handles.append(mid_norm.register_forward_pre_hook(lambda _m, a: mid.__setitem__("x", a[0])))
    try:
        for b in range(len(hidden)):
            x = hidden[b].to(dev)
            args, kw = kws[i][b]
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


def _reduce(stats: ActivationStats) -> None:
    """Sum every rank's share of ``stats`` (each rank ran at least one batch: the same keys everywhere)."""
    lin = [stats.linears[k] for k in sorted(stats.linears)]
    distributed.all_reduce_sum_([t for st in lin for t in (st.x_sum, st.x_sqsum, st.mabs_sq)])
    sums = [stats.layer_cos, stats.layer_angle, stats.attn_cos, stats.attn_angle, stats.mlp_cos, stats.mlp_angle]
    flat = [float(st.n) for st in lin] + [float(st.n_samples) for st in lin] + [float(stats.tokens)]
    flat += [d[i] for d in sums for i in sorted(d)]
    out = iter(distributed.all_reduce_floats(flat))
    for st in lin:
        st.n = int(next(out))
    for st in lin:
        st.n_samples = int(next(out))
    stats.tokens = int(next(out))
    for d in sums:
        for i in sorted(d):
            d[i] = next(out)


# What a non-finite calibration statistic means (the weights were checked finite when loaded).
STATS_FIX = ("the activations reaching it overflow or are nan: check the model's weights, or load it in fp32 "
             "(model.dtype: fp32)")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _record_head(model, hidden, stats: ActivationStats, names, modules) -> None:
    """Stats of the output head's input (the final norm's output), if the model has a head and it is wanted.

    Without a family the final norm is unknown: wanting the head's statistics is then an error."""
    fam = _family(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not is_matmul(head) or (modules is not None and names[head] not in modules):
        return
    if fam is None:
        raise ValueError(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}): "
                         f"statistics of {names[head]!r} need the final norm of a supported family "
                         "(shear.analyze.families)")
    if not fam.causal:
        return
    norm = _submodule(model.base_model, fam.final_norms[-1])
    if norm is None:
        return
    name = names[head]
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
    if kind != "layer" and not cos and stats.layer_cos:
        raise ValueError(f"importance: {metric} of a {kind} needs the residual stream between the sublayers; "
                         "this model's blocks run attention and MLP in parallel (score whole layers instead)")
    if metric == "block_influence":
        return {i: 1.0 - c / n for i, c in cos.items()}
    return {i: a / n / math.pi for i, a in ang.items()}
