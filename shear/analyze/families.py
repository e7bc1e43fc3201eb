"""Where each supported family keeps its parameters: the only family-specific knowledge of shear.

A :class:`Family` names module paths; the analyzer (``shear.analyze.build``) turns them into
groups and the slicer (``shear.prune.slice``) updates module attributes with :func:`set_attn_heads`.
Paths of ``layers``/``embeds``/``final_norms``/``extra_square`` are relative to the base model
(``model.model`` for ``LlamaForCausalLM``); ``q``/``k``/``v``/``o``/MLP/norm paths are relative to
one block.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Module layout of one architecture family.

    Attributes:
        name: family name shown in reports.
        layers: the ModuleList of blocks.
        embeds: embeddings whose columns are residual (hidden) channels.
        final_norms: norms over the hidden size outside the blocks.
        attn: the attention module (dropped with the attention sublayer).
        q, k, v, o: query/key/value/output projections; ``qkv`` instead of q/k/v when fused.
        gate, up, down: gated MLP; ``gate_up`` when fused (gate rows first); ``fc1``/``fc2`` when
            not gated.
        mlp: the MLP modules dropped with the MLP sublayer.
        attn_norms, mlp_norms: norms that only feed (or only post-process) that sublayer.
        block_norms: norms of a parallel block that feed both sublayers (Cohere's one input norm): sliced
            with the hidden size, never dropped with a sublayer.
        mid: the module whose input is the residual stream between the attention and MLP sublayers
            (OLMo 2's post-norm block: ``mlp``); default: the first MLP norm of a pre-norm block. A
            parallel block (``block_norms``) has none.
        parallel: the config flag that, when true, makes a block parallel (GPT-NeoX
            ``use_parallel_residual``: ``x + attn(n1(x)) + mlp(n2(x))``), so it has no ``mid``.
        qkv_per_head: fused q/k/v rows grouped by head (``[H, 3, D]``, GPT-NeoX) instead of ``[q; k; v]``.
        layer_lists: config lists with one entry per layer besides ``layer_types`` (SmolLM3's
            ``no_rope_layers``): re-indexed when layers are removed.
        norm: ``"rms"`` (x·w), ``"rms1p"`` (x·(1+w), Gemma) or ``"ln"`` (LayerNorm: hidden slicing is
            not exact, see ``shear.prune.slice``).
        conv1d: weights are ``[in, out]`` (GPT-2 ``Conv1D``) instead of ``[out, in]``.
        prenorm: sublayers are residual branches ``x + f(norm(x))``; only then can one be dropped.
        cfg: config attribute names: heads, kv_heads (None = MHA only), intermediate, hidden, layers.
        extra_square: hidden->hidden Linears outside the blocks (BERT pooler): both dims are hidden.
        bias_flags: config flags that give the stock class bias slots, and the projections each flag
            covers (Llama ``attention_bias`` covers q/k/v/o together). A projection that has no bias
            and no flag has no slot: the stock class cannot hold a bias added there.
        causal: a decoder trained on next-token prediction (False: encoders such as BERT).
        hidden_per_head: the stock config rejects a hidden size that is not a multiple of the head
            count (Llama, Gemma2 validate it): uniform hidden plans round to it to stay stock.
        refused: structures (``heads``, ``hidden``) the stock code cannot express, each with the reason: no
            head groups are built, and a target or plan naming the structure is refused with that line.
    """

    name: str
    layers: str
    embeds: tuple[str, ...]
    final_norms: tuple[str, ...]
    attn: str
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    down: str | None = None
    fc1: str | None = None
    fc2: str | None = None
    mlp: tuple[str, ...] = ("mlp",)
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    block_norms: tuple[str, ...] = ()
    layer_lists: tuple[str, ...] = ()
    mid: str | None = None
    parallel: str | None = None
    qkv_per_head: bool = False
    norm: str = "rms"
    conv1d: bool = False
    prenorm: bool = True
    cfg: tuple = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size",
                  "num_hidden_layers")
    extra_square: tuple[str, ...] = ()
    attn_style: str = "llama"
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    causal: bool = True
    hidden_per_head: bool = False
    refused: tuple[tuple[str, str], ...] = ()

    @property
    def mlp_out(self) -> str:
        return self.down or self.fc2

    def mid_input(self, config) -> str | None:
        """See ``mid``: the path whose input is the residual between the sublayers, or None."""
        if self.mid or self.block_norms or not self.prenorm:
            return self.mid
        if self.parallel and getattr(config, self.parallel, False):
            return None
        return self.mlp_norms[0] if self.mlp_norms else None

    def flag_for(self, path: str) -> str | None:
        """The config flag that gives projection ``path`` (relative to a block) a bias, if any."""
        return next((flag for flag, paths in self.bias_flags if path in paths), None)


_LLAMA = dict(layers="layers", embeds=("embed_tokens",), final_norms=("norm",), attn="self_attn",
              q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
              gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")

_ATTN_BIAS = ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
_MLP_BIAS = ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA, bias_flags=(_ATTN_BIAS, _MLP_BIAS), hidden_per_head=True),
    "mistral": Family("mistral", **_LLAMA),
    "qwen2": Family("qwen2", **_LLAMA),  # q/k/v always biased, o_proj and the MLP never
    "qwen3": Family("qwen3", **_LLAMA, bias_flags=(_ATTN_BIAS,)),
    "gemma": Family("gemma", **_LLAMA, norm="rms1p", bias_flags=(_ATTN_BIAS,)),
    "gemma2": Family("gemma2", **_LLAMA, norm="rms1p", bias_flags=(_ATTN_BIAS,), hidden_per_head=True,
                     attn_norms=("input_layernorm", "post_attention_layernorm"),
                     mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    # Gemma 3 text: Gemma 2's sandwich norms and 1+w RMSNorm, plus q_norm/k_norm over head_dim (one weight
    # shared by all heads: head and hidden slicing leave it; only their eps follows rms_norm_eps's d/d'
    # rescale, as the stock class builds every norm from that one value). Sliding-window layers, the
    # query_pre_attn_scalar scaling and final logit soft-capping are config values no slicing changes.
    "gemma3_text": Family("gemma3_text", **_LLAMA, norm="rms1p", bias_flags=(_ATTN_BIAS,), hidden_per_head=True,
                          attn_norms=("input_layernorm", "post_attention_layernorm"),
                          mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    # OLMo 2: post-norms (x + norm(f(x))), so each sublayer is still a residual branch that zeroes to 0;
    # q_norm/k_norm are RMSNorms over the whole projection (H*D, K*D): head slicing cuts them and
    # rescales their weight by sqrt(n/n') (shear.prune.slice); their eps stays the shared rms_norm_eps.
    "olmo2": Family("olmo2", **_LLAMA, bias_flags=(_ATTN_BIAS,), attn_norms=("post_attention_layernorm",),
                    mlp_norms=("post_feedforward_layernorm",), mid="mlp"),
    # Granite: Llama plus embedding/residual/attention multipliers and logits_scaling, config values that
    # no slicing changes (the export keeps them).
    "granite": Family("granite", **_LLAMA, bias_flags=(_ATTN_BIAS, _MLP_BIAS)),
    # SmolLM3: NoPE layers listed per layer in no_rope_layers (read at construction).
    "smollm3": Family("smollm3", **_LLAMA, bias_flags=(_ATTN_BIAS, _MLP_BIAS), layer_lists=("no_rope_layers",)),
    # Cohere (Command-R): parallel block (x + attn(n(x)) + mlp(n(x)), one LayerNorm without bias), logit_scale
    # in the config; the optional q/k norms are LayerNorms of weight [heads, head_dim] sliced by head.
    "cohere": Family("cohere", **_LLAMA, attn_norms=(), mlp_norms=(), block_norms=("input_layernorm",),
                     norm="ln", bias_flags=(_ATTN_BIAS,)),
    # StarCoder2: LayerNorm with bias, plain c_fc/c_proj MLP, use_bias covering every projection.
    "starcoder2": Family("starcoder2", **{k: v for k, v in _LLAMA.items() if k not in ("gate", "up", "down")},
                         fc1="mlp.c_fc", fc2="mlp.c_proj", norm="ln",
                         bias_flags=(("use_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.c_fc", "mlp.c_proj")),)),
    # GPT-NeoX (Pythia): fused query_key_value with rows [head, (q, k, v), head_dim]; parallel residual when
    # use_parallel_residual; partial rotary on the first rotary_ndims of each head (slicing keeps head_dim);
    # head_size = hidden // heads in the stock code, so heads / hidden export per-layer (as GPT-2), with
    # config.head_dim written for the rotary table.
    "gpt_neox": Family("gpt_neox", layers="layers", embeds=("embed_in",), final_norms=("final_layer_norm",),
                       attn="attention", qkv="attention.query_key_value", o="attention.dense",
                       fc1="mlp.dense_h_to_4h", fc2="mlp.dense_4h_to_h", norm="ln", attn_style="neox",
                       parallel="use_parallel_residual", qkv_per_head=True,
                       bias_flags=(("attention_bias", ("attention.query_key_value", "attention.dense")),),
                       cfg=("num_attention_heads", None, "intermediate_size", "hidden_size", "num_hidden_layers")),
    # Phi-1/1.5/2: parallel block from one LayerNorm (with bias), separate q/k/v, dense, fc1/fc2 (biased),
    # partial rotary, an LM head with a bias; the optional q/k LayerNorms are over head_dim (shared by heads),
    # but built from hidden // heads: with them, heads / hidden export per-layer.
    "phi": Family("phi", layers="layers", embeds=("embed_tokens",), final_norms=("final_layernorm",),
                  attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                  o="self_attn.dense", fc1="mlp.fc1", fc2="mlp.fc2", attn_norms=(), mlp_norms=(),
                  block_norms=("input_layernorm",), norm="ln"),
    # Falcon: fused query_key_value in three layouts (new_decoder_architecture: [kv, queries + k + v, head_dim];
    # multi_query: [q; k; v] with one KV head; else [head, (q, k, v), head_dim]), parallel or sequential
    # blocks with one or two LayerNorms by config, rotary or ALiBi. Its code derives head_dim from
    # hidden_size // num_attention_heads (and config.head_dim is a read-only property feeding the rotary
    # table), so no head or hidden slicing can be written back: both are refused. MLP channels and whole
    # blocks slice exactly; no sublayer groups (which norm feeds which sublayer depends on the config).
    "falcon": Family("falcon", layers="h", embeds=("word_embeddings",), final_norms=("ln_f",), attn="self_attention",
                     qkv="self_attention.query_key_value", o="self_attention.dense", fc1="mlp.dense_h_to_4h",
                     fc2="mlp.dense_4h_to_h", attn_norms=(), mlp_norms=(), norm="ln", prenorm=False,
                     block_norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"),
                     attn_style="falcon",
                     bias_flags=(("bias", ("self_attention.query_key_value", "self_attention.dense",
                                           "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),),
                     cfg=("num_attention_heads", "num_kv_heads", "ffn_hidden_size", "hidden_size", "num_hidden_layers"),
                     refused=(("heads", "falcon derives head_dim from hidden_size // num_attention_heads (a read-only "
                                        "config property feeding its rotary table): prune mlp and layers"),
                              ("hidden", "falcon derives head_dim from hidden_size // num_attention_heads: prune mlp "
                                         "and layers"))),
    "phi3": Family("phi3", layers="layers", embeds=("embed_tokens",), final_norms=("norm",), attn="self_attn",
                   qkv="self_attn.qkv_proj", o="self_attn.o_proj", gate_up="mlp.gate_up_proj",
                   down="mlp.down_proj", attn_style="phi3"),
    "gpt2": Family("gpt2", layers="h", embeds=("wte", "wpe"), final_norms=("ln_f",), attn="attn",
                   qkv="attn.c_attn", o="attn.c_proj", fc1="mlp.c_fc", fc2="mlp.c_proj",
                   attn_norms=("ln_1",), mlp_norms=("ln_2",), norm="ln", conv1d=True, attn_style="gpt2",
                   cfg=("n_head", None, "n_inner", "n_embd", "n_layer")),
    "opt": Family("opt", layers="decoder.layers", embeds=("decoder.embed_tokens", "decoder.embed_positions"),
                  final_norms=("decoder.final_layer_norm",), attn="self_attn", q="self_attn.q_proj",
                  k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", fc1="fc1", fc2="fc2",
                  mlp=("fc1", "fc2"), attn_norms=("self_attn_layer_norm",), mlp_norms=("final_layer_norm",),
                  norm="ln", attn_style="opt",
                  cfg=("num_attention_heads", None, "ffn_dim", "hidden_size", "num_hidden_layers")),
    "bert": Family("bert", layers="encoder.layer",
                   embeds=("embeddings.word_embeddings", "embeddings.position_embeddings",
                           "embeddings.token_type_embeddings"),
                   final_norms=("embeddings.LayerNorm",), attn="attention", q="attention.self.query",
                   k="attention.self.key", v="attention.self.value", o="attention.output.dense",
                   fc1="intermediate.dense", fc2="output.dense", mlp=("intermediate", "output"),
                   attn_norms=("attention.output.LayerNorm",), mlp_norms=("output.LayerNorm",), norm="ln",
                   prenorm=False, attn_style="bert", extra_square=("pooler.dense",), causal=False,
                   cfg=("num_attention_heads", None, "intermediate_size", "hidden_size", "num_hidden_layers")),
}


#: Family fields naming the projections of one block (q/k/v or fused qkv, o, MLP in/out).
PROJECTIONS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc1", "fc2")


def lora_targets(fam: Family) -> list[str]:
    """Default LoRA targets of a family: every projection of a block, as block-relative paths.

    Paths, not leaf names, because leaves are ambiguous: BERT's ``dense`` would also match
    ``pooler.dense``. A path P matches a module whose full path ends with ``.P`` (peft's list
    matching), so ``mlp.c_proj`` (GPT-2) is not confused with ``attn.c_proj``.
    Llama: ``self_attn.q_proj`` ... ``mlp.down_proj`` (7); Phi-3: ``self_attn.qkv_proj``,
    ``self_attn.o_proj``, ``mlp.gate_up_proj``, ``mlp.down_proj`` (4).
    """
    paths = [getattr(fam, f) for f in PROJECTIONS]
    return list(dict.fromkeys(p for p in paths if p))


#: per-layer pruned exports carry ``model_type = PRUNED_PREFIX + <stock model_type>`` so that loading
#: one without its modeling file fails by name instead of loading re-initialised weights.
PRUNED_PREFIX = "shear_"


def stock_model_type(model_type: str | None) -> str | None:
    """``"llama"`` for ``"shear_llama"`` (a per-layer export); other names unchanged."""
    if isinstance(model_type, str) and model_type.startswith(PRUNED_PREFIX):
        return model_type[len(PRUNED_PREFIX):]
    return model_type


def family_of(model) -> Family | None:
    """The :class:`Family` of a transformers model: by ``config.model_type``, else by structure (an unlisted
    Llama-shaped model gets the llama entry: :func:`shear.analyze.structure.match_llama`), or None."""
    fam = FAMILIES.get(stock_model_type(getattr(model.config, "model_type", None)))
    if fam is not None or not callable(getattr(model, "get_input_embeddings", None)):
        return fam
    from shear.analyze.structure import match_llama

    return match_llama(model, FAMILIES["llama"])[0]


def head_dim_of(fam: Family, attn, config) -> int:
    """Size of one attention head, read from the module (what forward uses), else the config."""
    for name in ("head_dim", "attention_head_size", "head_size"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    hd = getattr(config, "head_dim", None)
    return hd or config.hidden_size // config.num_attention_heads


def kv_heads_of(fam: Family, attn, config, heads_from_q: int | None) -> int:
    """Number of KV heads of one attention module."""
    if fam.cfg[1] is None:
        return heads_from_q
    if isinstance(getattr(attn, "num_key_value_heads", None), int):
        return attn.num_key_value_heads
    groups = getattr(attn, "num_key_value_groups", None)
    if heads_from_q is not None and isinstance(groups, int):
        return heads_from_q // groups
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def set_attn_heads(fam: Family, attn, heads: int, kv_heads: int, head_dim: int) -> None:
    """Update the attributes an attention module reads at forward time after head slicing.

    transformers 5.x reads ``num_key_value_groups`` (repeat_kv), Phi-3 also ``num_key_value_heads``
    and ``config.num_attention_heads`` (fused split), GPT-2 ``split_size``/``num_heads``, OPT
    ``num_heads``/``embed_dim``, BERT ``num_attention_heads``/``all_head_size``. A module whose
    widths differ from the shared config gets its own shallow config copy.
    """
    if fam.attn_style in ("llama", "phi3"):
        attn.num_key_value_groups = heads // kv_heads
    if fam.attn_style == "phi3":
        attn.num_key_value_heads = kv_heads
        if attn.config.num_attention_heads != heads:
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads = heads
    elif fam.attn_style == "gpt2":
        attn.num_heads, attn.split_size, attn.head_dim = heads, heads * head_dim, head_dim
    elif fam.attn_style == "opt":
        attn.num_heads, attn.head_dim = heads, head_dim
    elif fam.attn_style == "bert":
        attn.num_attention_heads, attn.all_head_size = heads, heads * head_dim
