"""Structured-pruning peers run from their original code on SmolLM2-135M, side by side, with benchlib's
protocol (the same model, texts and PPL windows as shear's real-model benchmark).

    SHEAR_CACHE=~/.cache/shear OMP_NUM_THREADS=2 python tools/bench_peers.py --peers-dir ../peers \\
        --out runs/peers [--peers dense,llm-pruner,flap,slicegpt,minitron] [--ratios 0.2,0.35,0.5]
    python tools/bench_peers.py --peers-dir ../peers --apply-patches     # once, after the checkouts

Rows: every peer at each ``--ratios`` entry, a fraction of ALL parameters removed (shear's counting:
``sum(p.numel() for p in model.parameters())``, the tied embedding once; 134,515,008 dense), no
recovery. Each row is one fresh process run through ``benchlib.measure`` (wall seconds and peak RSS of
that process: load, calibration, pruning and evaluation together; ``prune s`` is the pruning alone). The
pruned models have a different width in every layer (and FLAP adds biases), which a plain HF Llama
directory cannot describe, so each row evaluates its model in-process, right after pruning, with
benchlib's protocol (``shear.eval.perplexity.eval_text``, ``benchlib.PROTOCOL``: seq_len 256, 32
non-overlapping windows, texts docs and news, fp32, CPU, batch 8) - the same call ``benchlib.evaluate``
makes after loading a directory. The ``dense`` row loads the dense directory through
``benchlib.evaluate``. Writes OUT/results.json, OUT/table.md and one log per row under OUT/logs.

Getting the peers (at run time the script downloads nothing but the PyPI wheels benchlib uses)::

    mkdir -p ../peers && cd ../peers      # beside the repository
    git clone https://github.com/horseee/LLM-Pruner; git -C LLM-Pruner checkout 128a07d977f9b205d60ab14cfbc6a78f8a8e39d2
    git clone https://github.com/CASIA-IVA-Lab/FLAP; git -C FLAP checkout 3bb57db3449dd2fa04a5c2192de80e87e33be2b1
    git clone https://github.com/microsoft/TransformerCompression
    git -C TransformerCompression checkout 6b12cdee6ad51791d7c776b3a046bc408b9e77e9
    git clone https://github.com/locuslab/wanda; git -C wanda checkout 8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6
    cd -
    python tools/bench_peers.py --peers-dir ../peers --apply-patches   # the FLAP edits listed below

Python: the project's virtualenv has everything LLM-Pruner and FLAP need here. The SliceGPT and
Minitron rows need ``ml-collections`` (SliceGPT's config) and ``nvidia-modelopt`` (+ ``megatron-core``
for its Minitron plugin); to keep them out of the project's environment use a virtualenv layered on it
and run this script with that interpreter::

    python -m venv ../peers/.venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > ../peers/.venv/lib/python3.11/site-packages/zz_project_venv.pth
    ../peers/.venv/bin/pip install --no-deps ml-collections==1.1.0
    ../peers/.venv/bin/pip install nvidia-modelopt==0.47.0 megatron-core==0.16.1

Calibration text (all peers): shear's ``english`` source (Python standard-library docstrings; the
evaluation texts are disjoint from it), via ``shear.data.text.calibration_ids``.

1. LLM-Pruner (a git checkout of horseee/LLM-Pruner at commit 128a07d977f9b205d60ab14cfbc6a78f8a8e39d2).
   The block-wise path of its ``llama3.py`` (added for GQA models; it is ``hf_prune.py``'s path with
   ``k_proj`` instead of ``q_proj`` as the attention root and transformers' own ``LlamaForCausalLM``
   instead of the repository's transformers 4.x copy in ``LLMPruner/models/hf_llama``), run through its own
   ``LLMPruner.torch_pruning.MetaPruner`` and ``LLMPruner.pruner.hf_llama_pruner.TaylorImportance``:
   ``--pruner_type taylor --taylor param_first`` (first-order element-wise Taylor, "element1"),
   ``grouping_strategy sum``, ``iterative_steps 1``, local (not global) pruning, ``consecutive_groups``
   = head_dim on every ``k_proj``, roots ``k_proj`` (attention) and ``gate_proj`` (MLP) of the pruned
   layers. Layers: the README's Llama recipe prunes layers 4..29 of 32 (``--block_attention_layer_start
   4 --block_attention_layer_end 30``, same for MLP), i.e. keeps the first 4 and the last 2; scaled to
   30 layers that is start 4, end 28 (layers 4..27 pruned, 0-3 and 28-29 kept). Calibration: 10 samples
   x 64 tokens (``--num_examples 10``, ``seq_len = 64`` as in its ``get_examples('bookcorpus', ...)``),
   one forward/backward on the batch, as the script does. ``--pruning_ratio`` is the channel sparsity
   of the pruned layers, not a parameter ratio: for each target the script picks, on a 0.0005 grid, the
   ratio whose parameter count (computed with MetaPruner's own rounding) is nearest the target; KV heads
   are pruned whole (3 per layer here), so attention moves in thirds and 20% is reached only as 20.8%.
   Adaptations (no file of the checkout is edited):
   - ``LLMPruner/__init__.py`` imports ``LLMPruner.models`` (BLOOM/Baichuan/ChatGLM/LLaMA modeling
     files for transformers 4.x; ChatGLM's tokenizer fails with ``ModuleNotFoundError: No module named
     'sentencepiece'``). The Llama path does not use them: the row puts an empty ``LLMPruner.models``
     module into ``sys.modules`` before the import.
   - transformers 5 returns a ``DynamicCache`` object in the model output, which its
     ``torch_pruning.utils.flatten_as_list`` iterates into tuples while tracing
     (``AttributeError: 'tuple' object has no attribute 'grad_fn'`` in ``dependency.py`` ``_trace``):
     the row sets ``model.config.use_cache = False`` (no cache in the output).
   - The model is loaded with ``attn_implementation="eager"``. Under transformers 5's default SDPA path
     GQA goes to ``scaled_dot_product_attention(enable_gqa=True)`` without ``repeat_kv``, so the traced
     graph has no ``expand`` node and LLM-Pruner's GQA index mapping (``_ExpandIndexMapping``) is never
     applied: pruning one KV head then removes only one 64-wide query head (q 576->512 rows with 2 KV
     heads left, inconsistent; PPL 65,600 on 8 windows of docs at ratio 0.5). With eager attention the trace sees
     ``repeat_kv``'s expand and removes each KV head with its 3 query heads and their ``o_proj`` columns
     (checked against the dense weights). Evaluation switches back to SDPA, as benchlib.evaluate
     loads (eager and SDPA give the same PPL: 17.47197 on 4 windows of docs, dense).
   - fp32 on CPU, as ``hf_prune.py`` with ``--device cpu`` (``llama3.py`` loads fp16 for GPU).
   - The ``num_heads`` / ``num_key_value_heads`` attributes the script sets after pruning are set but
     unused by transformers 5 (its attention infers head counts from the weight shapes).
2. FLAP (a git checkout of CASIA-IVA-Lab/FLAP at commit 3bb57db3449dd2fa04a5c2192de80e87e33be2b1):
   ``lib.prune.prune_flap`` with ``--prune_method flap --metrics WIFV --structure AL-AM
   --remove_heads -1`` (its README's recipe), bias compensation and its per-layer standardization,
   real pruning (not ``--unstr``), ``model.seqlen = 128``. Calibration: 64 samples x 128 tokens
   (``--flap-nsamples``; its README uses 1024 x 128 of WikiText-2). FLAP's loop runs every sample
   through every layer one at a time; on the 2 shared cores this was measured on, one layer call on
   128 tokens took ~260 ms, so 128 samples already took 7-12 minutes of pruning per row and 64 keeps
   a row near 10 minutes. ``--pruning_ratio`` is the
   fraction of the decoder layers' linear weights (its compression weights count per-head and
   per-channel parameters, not the embedding): the row passes target x all params / layer linear
   params, the reported count is what came out (plus the 2 x 576 bias per layer FLAP adds).
   Edits to ``lib/prune.py`` (``--apply-patches`` applies them by plain string replacement; each is
   required on this model or this transformers and is a no-op for the LLaMA-7B MHA model FLAP targets):
   - head_dim 128 is hard-coded (LLaMA-7B): ``attn_mask.repeat_interleave(128)`` (both occurrences) and
     ``attn_metric.reshape(len(layers), -1, 128)`` now use ``head_dim * num_key_value_groups`` - under
     GQA the pruning unit is one KV group (1 KV head + its 3 query heads, 192 ``o_proj`` input
     channels), the only unit that keeps every layer a valid GQA attention; its score is FLAP's own
     mean of the standardized WIFV over the unit's channels.
   - ``k_proj`` / ``v_proj`` rows (and ``out_features``) are selected with the KV part of that mask
     (``attn_mask.view(-1, groups, head_dim)[:, 0]``); FLAP indexes them with the query mask (MHA).
   - ``baseline_inp.type(torch.half)`` (both) -> the layer's weight dtype: FLAP runs fp16 on CUDA; in
     fp32 the bias compensation ``half @ float`` raises ``RuntimeError: expected m1 and m2 to have the
     same dtype``.
   Not edited: the AL-AM compression weight ``512.0 / 3`` (parameters of one unit over one MLP channel,
   4*128*d / 3d for LLaMA-7B) is also exact for a GQA group here: (2*192 + 2*64)*d / 3d = 512/3.
   Adaptations in the row (no file edited):
   - Model: transformers' own ``LlamaForCausalLM`` with zero biases added to every ``o_proj`` and
     ``down_proj`` (what its ``get_llm`` does); FLAP's ``models/hf_llama/modeling_llama.py`` is a
     transformers 4.28 copy with head_dim 128 and MHA hard-coded (no GQA, 32 layers in ``get_llm``).
   - Its calibration loop calls decoder layers with ``position_ids`` only (before transformers 4.46 the
     attention computed RoPE itself); transformers 5 layers need ``position_embeddings``: a forward pre-hook
     fills them from the model's ``rotary_emb`` while ``prune_flap`` runs. Its ``layer(...)[0]`` now
     takes batch row 0 of a tensor (layers return a tensor) - the same values, batch size is 1.
   - ``get_loaders("wikitext2", ...)`` is replaced (``lib.prune.get_loaders``) by shear's calibration
     windows in FLAP's ``(input, target)`` format.
   - A layer whose every head FLAP removed gets an attention that returns the ``o_proj`` bias (what
     FLAP's own modeling computes with ``num_heads = 0``; transformers 5 cannot ``view`` 0 heads).
   - The pruned model cannot be saved as a loadable HF directory (per-layer widths, biases only on
     two projections): it is evaluated in-process.
3. SliceGPT (a git checkout of microsoft/TransformerCompression at commit
   6b12cdee6ad51791d7c776b3a046bc408b9e77e9; pins ``transformers==4.41.0``), 25% slicing: the row runs
   its own ``hf_utils.get_model_and_tokenizer`` (Llama-2 adapter on the local directory),
   ``layernorm_fusion.replace_layers`` / ``fuse_modules`` and ``rotate.rotate_and_slice`` (hidden
   576 -> 432, 32 x 256 calibration tokens) and records the error: its ``CompressedLlamaDecoderLayer``
   (``src/slicegpt/adapters/llama_adapter.py`` line 54) unpacks three values from ``self.self_attn``
   (transformers 4.41's ``(output, weights, past_key_value)``) - transformers 5's ``LlamaAttention``
   returns two and needs ``position_embeddings`` - ``ValueError: not enough values to unpack (expected
   3, got 2)``. A port of its decoder layer to the transformers 5 attention and cache API is beyond
   "adapt where required"; its code also has no handling of tied embeddings (SmolLM2 ties them).
4. Minitron width pruning via NVIDIA ModelOpt (``nvidia-modelopt`` 0.47.0, PyPI): the row calls
   ``modelopt.torch.prune.prune(model, mode="mcore_minitron", ...)`` on the HF model and records the
   error. The ``mcore_minitron`` plugin imports Megatron-Core and Transformer Engine
   (``megatron.core.extensions.transformer_engine``), so without them the mode is not registered
   (``KeyError: 'mcore_minitron'``). ``megatron-core`` 0.16.1 installs from PyPI, Transformer Engine
   does not: ``pip install transformer_engine[pytorch]`` (2.20.2) builds ``transformer_engine_torch`` from
   source and its setup fails on a CPU-only torch (``packaging.version.InvalidVersion: Invalid version:
   None``, the CUDA version of the torch build). The mode also converts only Megatron-Core ``GPTModel`` /
   ``HybridModel`` instances (an HF model must first be converted to Megatron), so Minitron does not run
   on CPU for an HF Llama here.
5. Wanda and SparseGPT, unstructured 50% and 2:4 (``--peers wanda,sparsegpt`` beside ``shear-wanda,
   shear-sparsegpt``; ``--sparse-patterns``): a git checkout of locuslab/wanda at commit
   8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6 (``git clone https://github.com/locuslab/wanda``), whose
   ``lib/prune.py`` holds ``prune_wanda`` and ``prune_sparsegpt`` (the latter with ``lib/sparsegpt.py``,
   IST-DASLab/sparsegpt at f5c2500 as its comment says). Called as its ``main.py`` does with
   ``--sparsity_type unstructured`` (``sparsity_ratio`` 0.5) or ``2:4`` (``prune_n=2, prune_m=4``),
   ``use_variant`` off, ``percdamp`` 0.01 and ``blocksize`` 128 (its fixed values; shear's defaults are
   the same). Calibration: 128 x 256 tokens of shear's ``english`` text (its ``get_loaders("c4", ...)`` is
   replaced by the same tensor the shear rows get). No file of the checkout is edited; adaptations in the
   row: ``model.hf_device_map = {}`` (its ``main.py`` loads with ``device_map="auto"``); the forward
   pre-hook that fills ``position_embeddings`` (as for FLAP); ``torch.cuda.synchronize`` made a no-op
   (``fasterprune`` times itself with it; a CPU-only torch raises); layers return a tensor, so its
   ``layer(...)[0]`` takes batch row 0 - the same values at its batch size 1. The shear rows call
   ``shear.sparse.sparsify_`` on a fresh copy with the same calibration tensor; every row is scored
   in-process with the same windows (the exports of ``shear sparsify`` are reloaded in a fresh process by
   tools/bench_real.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PEERS = {
    "llm-pruner": {"dir": "LLM-Pruner", "url": "https://github.com/horseee/LLM-Pruner",
                   "sha": "128a07d977f9b205d60ab14cfbc6a78f8a8e39d2"},
    "flap": {"dir": "FLAP", "url": "https://github.com/CASIA-IVA-Lab/FLAP",
             "sha": "3bb57db3449dd2fa04a5c2192de80e87e33be2b1"},
    "slicegpt": {"dir": "TransformerCompression", "url": "https://github.com/microsoft/TransformerCompression",
                 "sha": "6b12cdee6ad51791d7c776b3a046bc408b9e77e9"},
    "minitron": {"pip": "nvidia-modelopt==0.47.0"},
    "wanda": {"dir": "wanda", "url": "https://github.com/locuslab/wanda",
              "sha": "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6"},
    "sparsegpt": {"dir": "wanda", "url": "https://github.com/locuslab/wanda",
                  "sha": "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6"},
}
UNSTRUCTURED = ("wanda", "sparsegpt", "shear-wanda", "shear-sparsegpt")
METHODS = {
    "dense": "dense reference",
    "llm-pruner": "Taylor param_first (element1), block-wise heads+MLP, layers 4-27",
    "flap": "WIFV, AL-AM, bias compensation",
    "slicegpt": "PCA rotation + slicing of the hidden dim",
    "minitron": "ModelOpt mcore_minitron width pruning",
    "wanda": "Wanda (locuslab/wanda lib.prune.prune_wanda), |W| x ||X||, per output row",
    "sparsegpt": "SparseGPT (locuslab/wanda lib.prune.prune_sparsegpt = IST-DASLab f5c2500)",
    "shear-wanda": "shear.sparse.sparsify_ method=wanda, the same calibration tensor",
    "shear-sparsegpt": "shear.sparse.sparsify_ method=sparsegpt, the same calibration tensor",
}

_GROUPS = 'getattr(layer.self_attn, "num_key_value_groups", 1)'
_KV = f"attn_mask.view(-1, {_GROUPS}, layer.self_attn.head_dim)[:, 0].reshape(-1)"
# (peer dir, file, old, new, occurrences): plain string replacements, see the module docstring
PATCHES = [
    ("FLAP", "lib/prune.py", "attn_mask = attn_mask.repeat_interleave(128)",
     f"attn_mask = attn_mask.repeat_interleave(layer.self_attn.head_dim * {_GROUPS})", 2),
    ("FLAP", "lib/prune.py",
     "layer.self_attn.k_proj.weight.data = layer.self_attn.k_proj.weight.data[torch.where(attn_mask)[0]]",
     f"layer.self_attn.k_proj.weight.data = layer.self_attn.k_proj.weight.data[torch.where({_KV})[0]]", 1),
    ("FLAP", "lib/prune.py",
     "layer.self_attn.v_proj.weight.data = layer.self_attn.v_proj.weight.data[torch.where(attn_mask)[0]]",
     f"layer.self_attn.v_proj.weight.data = layer.self_attn.v_proj.weight.data[torch.where({_KV})[0]]", 1),
    ("FLAP", "lib/prune.py", "layer.self_attn.k_proj.out_features = attn_mask.sum().item()",
     f"layer.self_attn.k_proj.out_features = {_KV}.sum().item()", 1),
    ("FLAP", "lib/prune.py", "layer.self_attn.v_proj.out_features = attn_mask.sum().item()",
     f"layer.self_attn.v_proj.out_features = {_KV}.sum().item()", 1),
    ("FLAP", "lib/prune.py", "attn_metric = attn_metric.reshape(len(layers), -1, 128).mean(dim=2)",
     "attn_metric = attn_metric.reshape(len(layers), -1, layers[0].self_attn.head_dim * "
     "getattr(layers[0].self_attn, \"num_key_value_groups\", 1)).mean(dim=2)", 1),
    ("FLAP", "lib/prune.py", "wrapped_layers[name].baseline_inp.type(torch.half)",
     "wrapped_layers[name].baseline_inp.type(subset[name].weight.dtype)", 2),
]


def apply_patches(peers_dir: Path, check_only: bool = False, only: str | None = None) -> list[str]:
    """Apply (or, ``check_only``, verify) :data:`PATCHES`; idempotent. Returns what was done."""
    done = []
    for d, f, old, new, n in PATCHES:
        if only and d != only:
            continue
        p = peers_dir / d / f
        src = p.read_text()
        if src.count(new) == n and old not in src.replace(new, ""):
            done.append(f"{d}/{f}: already applied: {old[:60]}")
            continue
        if check_only:
            raise SystemExit(f"{p}: patch not applied ({old[:70]!r}); run with --apply-patches")
        if src.count(old) != n:
            raise SystemExit(f"{p}: expected {n} x {old[:70]!r}, found {src.count(old)} (wrong commit?)")
        p.write_text(src.replace(old, new))
        done.append(f"{d}/{f}: applied: {old[:60]}")
    return done


# ---------------------------------------------------------------------------------------------- helpers

def _nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _eval_inprocess(model, tok, windows: int) -> dict:
    """benchlib.evaluate's measurement on a model in memory (same function, protocol and batch)."""
    import torch

    from shear.eval.perplexity import eval_text

    torch.manual_seed(0)
    model.eval()
    out = {}
    with torch.no_grad():
        for name in benchlib.TEXTS:
            r = eval_text(model, tok, benchlib.text(name), seq_len=benchlib.PROTOCOL["seq_len"],
                          max_windows=windows, batch_size=8)
            out[name] = round(r.ppl, 3)
    return out


_CALIB: list[dict] = []  # what each row calibrated on (shear's english text changes with the checkout)


def _calibration(tok, n: int, seq_len: int):
    import hashlib

    from shear.data.text import calibration_ids

    ids = calibration_ids(tok, n, seq_len, 0, source="english")
    _CALIB.append({"n": n, "seq_len": seq_len, "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]})
    return ids


def _linear_layer_params(cfg) -> int:
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    return cfg.num_hidden_layers * (attn + 3 * d * i)


def llm_pruner_ratio(cfg, total: int, target: float, layers: int) -> tuple[float, int]:
    """LLM-Pruner's ``--pruning_ratio`` whose block-wise result is nearest ``target`` of all parameters,
    with MetaPruner.prune_local's rounding: n_pruned = C - int(C * (1 - r)); KV heads in whole heads."""
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    kv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads

    def removed(r):
        heads = (kv * hd - int(kv * hd * (1 - r))) // hd
        ch = i - int(i * (1 - r))
        return layers * (heads * hd * 2 * d * (1 + rep) + ch * 3 * d)

    best = min((abs(removed(k / 2000) / total - target), k / 2000) for k in range(1, 2000))[1]
    return best, total - removed(best)


def _rope_hooks(model) -> list:
    """Forward pre-hooks that give each decoder layer the ``position_embeddings`` transformers 5 layers need
    (the peers' loops call layers with ``position_ids`` only, as before transformers 4.46)."""
    rotary = model.model.rotary_emb

    def add_rope(mod, args, kwargs):
        if kwargs.get("position_embeddings") is None and kwargs.get("position_ids") is not None:
            kwargs["position_embeddings"] = rotary(args[0], kwargs["position_ids"])
        return args, kwargs

    return [layer.register_forward_pre_hook(add_rope, with_kwargs=True) for layer in model.model.layers]


def _no_heads_attention(o_proj):
    import torch

    class NoHeads(torch.nn.Module):
        """Attention with every head removed: its output is o_proj's bias (FLAP's num_heads = 0)."""

        def __init__(self, o):
            super().__init__()
            self.o_proj = o

        def forward(self, hidden_states, *args, **kwargs):
            out = torch.zeros_like(hidden_states)
            if self.o_proj.bias is not None:
                out = out + self.o_proj.bias
            return out, None

    return NoHeads(o_proj)


# ------------------------------------------------------------------------------------------------- rows

def row_dense(a) -> dict:
    r = benchlib.evaluate(str(a.model), windows=a.windows)
    return {"params": r["params"], "docs": r["docs"], "news": r["news"], "prune_s": 0.0,
            "notes": "loaded by benchlib.evaluate (plain from_pretrained)"}


def row_llm_pruner(a) -> dict:
    import random

    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    root = a.peers_dir / PEERS["llm-pruner"]["dir"]
    sys.path.insert(0, str(root))
    stub = types.ModuleType("LLMPruner.models")  # the 4.x model zoo the Llama path does not use
    stub.__path__ = []
    sys.modules["LLMPruner.models"] = stub
    import LLMPruner.torch_pruning as tp
    from LLMPruner.pruner import hf_llama_pruner as llama_pruner

    random.seed(42), np.random.seed(42), torch.manual_seed(42)  # its set_random_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    start, end = a.llmp_start, a.llmp_end
    total = _nparams(model)
    ratio, predicted = llm_pruner_ratio(model.config, total, a.ratio, end - start)
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(True)
    forward_prompts = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338],
                                    [1, 3439, 17632, 1925, 29892, 278, 6368, 310]])  # llama3.py's, graph only
    imp = llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first")
    kwargs = {
        "importance": imp,
        "global_pruning": False,
        "iterative_steps": 1,
        "ch_sparsity": ratio,
        "ignored_layers": [],
        "channel_groups": {},
        "consecutive_groups": {layer.self_attn.k_proj: layer.self_attn.head_dim for layer in model.model.layers},
        "customized_pruners": {LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner},
        "root_module_types": None,
        "root_instances": [model.model.layers[i].self_attn.k_proj for i in range(start, end)]
                          + [model.model.layers[i].mlp.gate_proj for i in range(start, end)],
    }
    pruner = tp.pruner.MetaPruner(model, forward_prompts, **kwargs)
    model.zero_grad()
    example_prompts = _calibration(tok, a.llmp_examples, 64)
    loss = model(example_prompts, labels=example_prompts).loss
    loss.backward()
    pruner.step()
    for layer in model.model.layers:  # llama3.py; unused by transformers 5
        layer.self_attn.num_heads = layer.self_attn.q_proj.weight.data.shape[0] // layer.self_attn.head_dim
        layer.self_attn.num_key_value_heads = layer.self_attn.k_proj.weight.data.shape[0] // layer.self_attn.head_dim
    model.zero_grad()
    for _, prm in model.named_parameters():
        prm.grad = None
        prm.requires_grad_(False)
    del pruner
    prune_s = time.perf_counter() - t0
    params = _nparams(model)
    heads = [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in model.model.layers]
    mlp = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    model.set_attn_implementation("sdpa")
    ev = _eval_inprocess(model, tok, a.windows)
    note = (f"pruning_ratio {ratio:.4f} on layers {start}-{end - 1}; loss on calibration {loss.item():.3f}; "
            f"q heads/layer {sorted(set(heads))}, MLP {sorted(set(mlp))}")
    if params != predicted:
        note += f"; predicted {predicted:,} params"
    return {"params": params, **ev, "prune_s": round(prune_s, 1), "notes": note,
            "detail": {"pruning_ratio": ratio, "heads": heads, "mlp": mlp, "calib_loss": loss.item()}}


def row_flap(a) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = a.peers_dir / PEERS["flap"]["dir"]
    apply_patches(a.peers_dir, check_only=True, only="FLAP")
    sys.path.insert(0, str(root))
    import lib.prune as flap

    np.random.seed(0), torch.random.manual_seed(0)  # main.py's seeds (--seed 0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ratio = a.ratio * _nparams(model) / _linear_layer_params(model.config)
    for layer in model.model.layers:  # get_llm: zero biases on o_proj and down_proj
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
    model.seqlen = 128
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    ids = _calibration(tok, a.flap_nsamples, model.seqlen)

    def get_loaders(name, nsamples=128, seed=0, seqlen=128, tokenizer=None):
        loader = []
        for row in ids[:nsamples]:
            inp = row.unsqueeze(0)
            tar = inp.clone()
            tar[:, :-1] = -100
            loader.append((inp, tar))
        return loader, None

    flap.get_loaders = get_loaders
    hooks = _rope_hooks(model)
    args = types.SimpleNamespace(prune_method="flap", pruning_ratio=ratio, remove_heads=-1, metrics="WIFV",
                                 structure="AL-AM", nsamples=a.flap_nsamples, seed=0, unstr=False)
    t0 = time.perf_counter()
    flap.prune_flap(args, model, tok, torch.device("cpu"))
    prune_s = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    hd = model.config.head_dim
    heads = [layer.self_attn.q_proj.weight.shape[0] // hd for layer in model.model.layers]
    mlp = [layer.mlp.gate_proj.weight.shape[0] for layer in model.model.layers]
    for layer in model.model.layers:
        if layer.self_attn.q_proj.weight.shape[0] == 0:
            layer.self_attn = _no_heads_attention(layer.self_attn.o_proj)
    params = _nparams(model)
    ev = _eval_inprocess(model, tok, a.windows)
    note = (f"pruning_ratio {ratio:.4f} (of layer linears); {a.flap_nsamples} x 128 calibration; "
            f"q heads/layer min {min(heads)} max {max(heads)} ({sum(h == 0 for h in heads)} layers with none), "
            f"MLP min {min(mlp)} max {max(mlp)}; evaluated in-process")
    return {"params": params, **ev, "prune_s": round(prune_s, 1), "notes": note,
            "detail": {"pruning_ratio": ratio, "heads": heads, "mlp": mlp}}


def row_slicegpt(a) -> dict:
    import torch

    root = a.peers_dir / PEERS["slicegpt"]["dir"]
    sys.path.insert(0, str(root / "src"))
    from slicegpt import hf_utils, layernorm_fusion, rotate
    from slicegpt.slicing_scheduler import ConstSlicingScheduler

    ma, tok = hf_utils.get_model_and_tokenizer("meta-llama/Llama-2-7b-hf", str(a.model), dtype=torch.float32)
    model = ma.model
    t0 = time.perf_counter()
    layernorm_fusion.replace_layers(ma)
    layernorm_fusion.fuse_modules(ma)
    ids = _calibration(tok, 32, 256)
    loader = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])} for i in range(0, 32, 8)]
    new_dim = int((1 - a.ratio) * ma.hidden_size)
    new_dim -= new_dim % 8  # run_slicegpt.py's --round-interval 8
    rotate.rotate_and_slice(ma, loader, ConstSlicingScheduler(new_dim), final_orientation="random")
    prune_s = time.perf_counter() - t0
    params = _nparams(model)
    ev = _eval_inprocess(model, tok, a.windows)
    return {"params": params, **ev, "prune_s": round(prune_s, 1), "notes": f"slicing {a.ratio:.0%}: {new_dim}"}


def row_minitron(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import modelopt
    import modelopt.torch.prune as mtp

    errors = []
    try:
        from modelopt.torch.prune.plugins import mcore_minitron  # noqa: F401
    except Exception as e:  # noqa: BLE001
        errors.append(f"plugin import: {type(e).__name__}: {e}")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    keep = 1 - a.ratio
    cfg = model.config
    export = {"ffn_hidden_size": int(cfg.intermediate_size * keep), "hidden_size": int(cfg.hidden_size * keep)}
    try:
        mtp.prune(model, mode="mcore_minitron", constraints={"export_config": export}, dummy_input=None,
                  config={"forward_loop": lambda m: m(torch.tensor([[1, 2, 3]]))})
    except Exception as e:  # noqa: BLE001
        errors.append(f"mtp.prune(HF LlamaForCausalLM, mode='mcore_minitron'): {type(e).__name__}: {e}")
    raise RuntimeError(f"nvidia-modelopt {modelopt.__version__}: " + " | ".join(errors))


def _sparsity(model) -> float:
    import torch

    zeros = total = 0
    for layer in model.model.layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                zeros += int((mod.weight == 0).sum())
                total += mod.weight.numel()
    return zeros / total


def _unstructured_result(model, tok, a, prune_s: float, note: str) -> dict:
    ev = _eval_inprocess(model, tok, a.windows)
    return {"params": _nparams(model), **ev, "prune_s": round(prune_s, 1),
            "notes": f"{note}; block linears {_sparsity(model):.2%} zeros; {a.sparse_nsamples} x "
                     f"{a.sparse_seqlen} calibration; evaluated in-process"}


def _nm(a) -> tuple[int, int]:
    return tuple(int(x) for x in a.pattern.split(":")) if a.pattern else (0, 0)


def row_original_unstructured(a) -> dict:
    """Wanda or SparseGPT through the Wanda repository's own ``prune_wanda`` / ``prune_sparsegpt``."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = a.peers_dir / PEERS[a.peer]["dir"]
    sys.path.insert(0, str(root))
    import lib.prune as wp

    np.random.seed(0), torch.random.manual_seed(0)  # main.py's seeds (--seed 0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.seqlen = a.sparse_seqlen
    model.hf_device_map = {}  # main.py loads with device_map="auto"; the functions look blocks up in it
    model.eval()
    ids = _calibration(tok, a.sparse_nsamples, model.seqlen)

    def get_loaders(name, nsamples=128, seed=0, seqlen=128, tokenizer=None):
        return [(row.unsqueeze(0), None) for row in ids[:nsamples]], None

    wp.get_loaders = get_loaders
    hooks = _rope_hooks(model)
    torch.cuda.synchronize = lambda *args, **kw: None  # fasterprune's timing call; CPU-only torch raises
    n, m = _nm(a)
    args = types.SimpleNamespace(nsamples=a.sparse_nsamples, seed=0, sparsity_ratio=0.5 if n == 0 else 0.0,
                                 use_variant=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        if a.peer == "wanda":
            wp.prune_wanda(args, model, tok, torch.device("cpu"), prune_n=n, prune_m=m)
        else:
            wp.prune_sparsegpt(args, model, tok, torch.device("cpu"), prune_n=n, prune_m=m)
    prune_s = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return _unstructured_result(model, tok, a, prune_s, f"{a.pattern or '50%'}, original code")


def row_shear_unstructured(a) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from shear.sparse import SparsifyConfig, sparsify_

    np.random.seed(0), torch.random.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    ids = _calibration(tok, a.sparse_nsamples, a.sparse_seqlen)
    cfg = SparsifyConfig(method=a.peer.removeprefix("shear-"), sparsity=None if a.pattern else 0.5,
                         pattern=a.pattern, n_samples=a.sparse_nsamples, seq_len=a.sparse_seqlen)
    t0 = time.perf_counter()
    sparsify_(model, cfg, ids)
    prune_s = time.perf_counter() - t0
    return _unstructured_result(model, tok, a, prune_s, f"{a.pattern or '50%'}, shear")


ROWS = {"dense": row_dense, "llm-pruner": row_llm_pruner, "flap": row_flap, "slicegpt": row_slicegpt,
        "minitron": row_minitron, "wanda": row_original_unstructured, "sparsegpt": row_original_unstructured,
        "shear-wanda": row_shear_unstructured, "shear-sparsegpt": row_shear_unstructured}


def run_row(a) -> int:
    out = {"peer": a.peer, "method": METHODS[a.peer], "target": a.pattern or a.ratio}
    try:
        out.update(ROWS[a.peer](a))
        rc = 0
    except Exception as e:  # noqa: BLE001  (the row's error is its result)
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        out["error"] = f"{type(e).__name__}: {e}"[:600]
        frames = [f for f in traceback.extract_tb(e.__traceback__) if str(a.peers_dir) in f.filename]
        if frames:
            f = frames[-1]
            out["error"] += f" (at {Path(f.filename).relative_to(a.peers_dir)}:{f.lineno} in {f.name})"
        out["traceback"] = tb[-3000:]
        rc = 1
    out["calibration"] = _CALIB
    Path(a.json).write_text(json.dumps(out, indent=1))
    return rc


# ----------------------------------------------------------------------------------------- orchestrator

COLS = [("peer", "peer"), ("method", "method"), ("target", "target ratio"), ("params", "params"),
        ("removed", "removed"), ("docs", "PPL docs"), ("news", "PPL news"), ("vs_dense", "ratio to dense"),
        ("wall_s", "wall s"), ("prune_s", "prune s"), ("peak_rss_mb", "peak RSS MB"), ("notes", "notes")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs="?", default="bench", choices=["bench", "row"])
    ap.add_argument("--peers-dir", type=Path, default=Path("../peers"))
    ap.add_argument("--out", type=Path, default=Path("runs/peers"))
    ap.add_argument("--model", type=Path, default=None, help="HF directory (default: benchlib.smollm2())")
    ap.add_argument("--peers", default="dense,llm-pruner,flap,slicegpt,minitron")
    ap.add_argument("--ratios", default="0.2,0.35,0.5", help="fractions of all parameters removed")
    ap.add_argument("--slicegpt-ratio", type=float, default=0.25, help="SliceGPT slicing of the hidden dim")
    ap.add_argument("--windows", type=int, default=benchlib.PROTOCOL["windows"])
    ap.add_argument("--llmp-start", type=int, default=4, help="block_*_layer_start (README 4 of 32)")
    ap.add_argument("--llmp-end", type=int, default=28, help="block_*_layer_end (README 30 of 32 -> 28 of 30)")
    ap.add_argument("--llmp-examples", type=int, default=10)
    ap.add_argument("--flap-nsamples", type=int, default=64, help="FLAP calibration samples of 128 tokens")
    ap.add_argument("--sparse-patterns", default="0.5,2:4",
                    help="unstructured peers (wanda, sparsegpt, shear-wanda, shear-sparsegpt): 0.5 or N:M")
    ap.add_argument("--sparse-nsamples", type=int, default=128, help="unstructured calibration samples")
    ap.add_argument("--sparse-seqlen", type=int, default=256, help="unstructured calibration tokens per sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--apply-patches", action="store_true", help="apply the documented edits to the checkouts, exit")
    # one row (internal: run by benchlib.measure in a fresh process)
    ap.add_argument("--peer")
    ap.add_argument("--ratio", type=float)
    ap.add_argument("--pattern", default=None, help="N:M for an unstructured row (else 50%% unstructured)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.peers_dir = a.peers_dir.resolve()
    if a.apply_patches:
        print("\n".join(apply_patches(a.peers_dir)))
        return 0
    a.model = (a.model or benchlib.smollm2()).resolve()
    if a.cmd == "row":
        return run_row(a)

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "logs").mkdir(exist_ok=True)
    plan = []
    for peer in a.peers.split(","):
        if peer == "dense":
            plan.append((peer, 0.0, None))
        elif peer in ("slicegpt",):
            plan.append((peer, a.slicegpt_ratio, None))
        elif peer in UNSTRUCTURED:
            plan += [(peer, 0.5, None if ":" not in x else x) for x in a.sparse_patterns.split(",")]
        else:
            plan += [(peer, float(r), None) for r in a.ratios.split(",")]
    rows, dense, failed = [], None, {}
    for peer, ratio, pattern in plan:
        name = f"{peer}-{pattern.replace(':', '_') if pattern else f'{ratio:g}'}"
        if peer in failed:  # the same code path fails again: one row says why
            print(f"    {name}: skipped, {peer} failed at {failed[peer]}", flush=True)
            continue
        js, log = a.out / "logs" / f"{name}.json", a.out / "logs" / name
        js.unlink(missing_ok=True)
        argv_row = [str(Path(__file__).resolve()), "row", "--peer", peer, "--ratio", str(ratio), "--json", str(js),
                    "--peers-dir", str(a.peers_dir), "--model", str(a.model), "--windows", str(a.windows),
                    "--llmp-start", str(a.llmp_start), "--llmp-end", str(a.llmp_end),
                    "--llmp-examples", str(a.llmp_examples), "--flap-nsamples", str(a.flap_nsamples),
                    "--sparse-nsamples", str(a.sparse_nsamples), "--sparse-seqlen", str(a.sparse_seqlen),
                    *(["--pattern", pattern] if pattern else [])]
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        m = benchlib.measure(argv_row, log=log, threads=a.threads)
        r = json.loads(js.read_text()) if js.exists() else {"peer": peer, "method": METHODS[peer],
                                                             "target": pattern or ratio,
                                                             "error": f"no result (rc {m['rc']}), see {log}"}
        r.update(m)
        if peer == "dense" and "docs" in r:
            dense = r
        if "error" in r:
            failed[peer] = pattern or ratio
        rows.append(r)
        print(f"    {json.dumps({k: v for k, v in r.items() if k not in ('traceback', 'detail')})}", flush=True)
    for r in rows:
        if "error" in r:
            r["notes"] = "FAILED: " + r["error"].splitlines()[0][:500].replace("|", ";")
            if sum(p == r["peer"] for p, _, _ in plan) > 1:
                r["notes"] += " (its other ratios skipped)"
            continue
        if dense:
            r["removed"] = f"{1 - r['params'] / dense['params']:.1%}"
            r["vs_dense"] = f"{r['docs'] / dense['docs']:.2f} / {r['news'] / dense['news']:.2f}"
    import platform

    head = [f"Command: `OMP_NUM_THREADS={a.threads} python tools/bench_peers.py " + " ".join(sys.argv[1:]) + "`",
            f"Model: {a.model}; protocol {json.dumps(benchlib.PROTOCOL)}; texts {', '.join(benchlib.TEXTS)}; "
            f"CPU: {benchlib.cpu_name()} ({platform.machine()}), {a.threads} threads",
            "ratio to dense: PPL docs / PPL news over the dense row's; wall s and peak RSS: the whole row "
            "process (load, calibration, pruning, evaluation); prune s: pruning alone.", ""]
    md = "\n".join(head) + benchlib.table(rows, COLS) + "\n"
    (a.out / "table.md").write_text(md)
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    (a.out / "results.json").write_text(json.dumps({"command": sys.argv, "shear_commit": git,
                                                    "shear_tracked_changes": bool(dirty),
                                                    "protocol": benchlib.PROTOCOL,
                                                    "model": str(a.model), "peers": PEERS, "rows": rows}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
