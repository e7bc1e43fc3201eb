"""Memory and compute arithmetic of a run, pure functions on counts (no model, no I/O).

Every function returns bytes (or FLOPs) and the formula it used, as ``(value, formula)``, so the
dry-run report can print both. Symbols: P parameters, b micro-batch, s sequence length, L layers,
h hidden size, q = query heads x head_dim, kv = KV heads x head_dim, i MLP width, V vocabulary,
N ranks (processes).

Sharding follows what each engine divides across ranks (ZeRO, Rajbhandari et al. 2020):
ZeRO-1 optimizer state; ZeRO-2 + gradients; ZeRO-3 + parameters; FSDP FULL_SHARD (= ZeRO-3),
SHARD_GRAD_OP (= ZeRO-2), NO_SHARD (= DDP). DeepSpeed keeps an fp32 master copy of every trainable
parameter next to AdamW's two fp32 moments (12 bytes per trainable parameter, the paper's K = 12);
torch AdamW (DDP, one process) keeps its two moments in the parameter's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

#: fp32 [chunk, V] buffers alive at the peak of one chunk of the KD loss (shear.train.losses.chunked_logit_losses):
#: student logits (bf16 out + fp32 copy), teacher logits (same), two log-softmaxes, p = exp(log p), log p - log q,
#: and their product; two bf16 tensors count as one fp32. tools/bench_kd_memory.py measured 368 / 587 MiB of peak
#: growth for chunks of 256 / 512 at V = 32,000 (docs/BENCHMARKS.md), against 262 / 524 MB for 8 buffers.
KD_CHUNK_BUFFERS = 8
#: [b, s, V] buffers of a validation CE forward (shear.train.student.LossModule._ce, no grad): bf16 logits,
#: their fp32 copy and cross_entropy's fp32 log-softmax = 2 + 4 + 4 bytes per element.
VAL_LOGIT_BYTES = 10
#: fraction of a GPU's memory the estimate may use: the rest is the CUDA context, allocator fragmentation
#: and the communication buffers the estimate does not count.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Shape:
    """The sizes activations depend on (from a model config)."""

    layers: int
    hidden: int
    q: int  # query heads x head_dim
    kv: int  # KV heads x head_dim
    mlp: int  # intermediate size
    vocab: int


def shards(engine: str, zero_stage: int | None) -> dict[str, bool]:
    """Which of params / grads / optimizer state ``engine`` divides across ranks.

    engine: 'single', 'ddp', 'deepspeed' (with ``zero_stage`` 0-3) or 'fsdp' (``zero_stage`` = the ZeRO stage
    its sharding strategy equals: FULL_SHARD 3, SHARD_GRAD_OP 2, NO_SHARD 0).
    """
    z = (zero_stage or 0) if engine in ("deepspeed", "fsdp") else 0
    return {"params": z >= 3, "grads": z >= 2, "optim": z >= 1}


def divided(n_bytes: int, sharded: bool, ranks: int) -> int:
    return -(-n_bytes // ranks) if sharded else n_bytes


def optimizer_bytes(trainable: int, param_bytes: int, deepspeed: bool) -> tuple[int, str]:
    """AdamW state of ``trainable`` parameters (before sharding)."""
    if deepspeed:
        return trainable * 12, "trainable x (4 fp32 master + 2 x 4 fp32 AdamW moments) = 12 B each (DeepSpeed)"
    return trainable * 2 * param_bytes, f"trainable x 2 AdamW moments x {param_bytes} B (torch AdamW: the parameter's dtype)"


def layer_elements(sh: Shape) -> int:
    """Elements autograd keeps per token for one pre-norm attention + gated-MLP block (SDPA attention, no
    dropout): 2 norm inputs + 2 norm outputs (4h), q, k, v before and after RoPE and the attention output (3q + 3kv),
    gate, up, act(gate) and the product (4i)."""
    return 4 * sh.hidden + 3 * sh.q + 3 * sh.kv + 4 * sh.mlp


def layer_bytes(sh: Shape, act_bytes: int, extra: int = 0) -> int:
    """Bytes autograd keeps per token for one block: :func:`layer_elements` (+ ``extra``) at ``act_bytes``, plus the
    fp32 copies of the two RMSNorm inputs under 16-bit activations (the norm computes in fp32). Checked against
    autograd's saved tensors of a bf16 Llama in tests/test_dryrun.py."""
    return (layer_elements(sh) + extra) * act_bytes + (2 * sh.hidden * 4 if act_bytes < 4 else 0)


def activation_bytes(sh: Shape, batch: int, seq: int, act_bytes: int, checkpointing: bool,
                     extra_per_layer: int = 0) -> tuple[int, str]:
    """Training activations of one micro-batch. ``extra_per_layer``: elements per token per layer on top of
    :func:`layer_elements` (LoRA's rank-r outputs, learned masks' products)."""
    per_layer = layer_bytes(sh, act_bytes, extra_per_layer)
    e = layer_elements(sh) + extra_per_layer
    norms = " + 2h*4" if act_bytes < 4 else ""
    what = (f"E = 4h+3q+3kv+4i{'+extra' if extra_per_layer else ''} = {e} elements per token"
            + ("; 2h*4: the two RMSNorms' fp32 inputs" if norms else ""))
    tokens = batch * seq
    if checkpointing:
        return (tokens * (sh.layers * sh.hidden * act_bytes + per_layer),
                f"b*s*(L*h*{act_bytes} + E*{act_bytes}{norms}) B: each layer's input kept, one layer recomputed in "
                f"backward; {what}")
    return tokens * sh.layers * per_layer, f"b*s*L*(E*{act_bytes}{norms}) B, {what} per layer"


def teacher_forward_bytes(sh: Shape, batch: int, seq: int, act_bytes: int, every_layer: bool) -> tuple[int, str]:
    """A no-grad teacher forward (shear.train.student.teacher_hidden_states) whose outputs stay alive for the step:
    every layer's hidden states (L+1, hidden-state KD) or the final ones only, + one layer's working set."""
    kept, what, why = ((sh.layers + 1, "(L+1)*h", "every layer's hidden states (hidden-state KD)") if every_layer
                       else (1, "h", "the final hidden states only (no hidden-state KD)"))
    n = batch * seq * (kept * sh.hidden + layer_elements(sh))
    return n * act_bytes, f"b*s*({what} + E)*{act_bytes} B: {why} kept for the step + one layer's working set"


def kd_logit_bytes(batch: int, seq: int, vocab: int, chunk: int | None) -> tuple[int, str]:
    """fp32 logits of the KD loss: chunked (shear's trainer) or whole."""
    tokens = batch * (seq - 1)
    if chunk is None:
        return batch * seq * vocab * 4, "b*s*V*4 B (whole fp32 logits)"
    c = min(chunk, tokens)
    return (c * vocab * 4 * KD_CHUNK_BUFFERS,
            f"min(chunk, b*(s-1))*V*4 B x {KD_CHUNK_BUFFERS} buffers = {c}*{vocab}*4*{KD_CHUNK_BUFFERS} "
            f"(unchunked it would be b*s*V*4 = {batch * seq * vocab * 4:,} B per buffer)")


def validation_bytes(batch: int, seq: int, vocab: int) -> tuple[int, str]:
    return batch * seq * vocab * VAL_LOGIT_BYTES, f"b*s*V*{VAL_LOGIT_BYTES} B (whole logits: bf16, fp32 copy, log-softmax)"


def calibration_bytes(sh: Shape, n_samples: int, seq: int, batch: int, act_bytes: int,
                      stat_bytes: int = 8) -> tuple[int, str]:
    """Streaming block-by-block calibration (shear.importance.calibrate, shear.sparse.sequential): one block's
    inputs and outputs for the whole calibration set, one batch's intermediates, and a statistics hook's copy of
    its widest input (x and its square, in fp64 for channel norms or fp32 for a Hessian)."""
    n = 2 * n_samples * seq * sh.hidden + batch * seq * layer_elements(sh)
    widest = max(sh.hidden, sh.q, sh.mlp)
    stats = 2 * batch * seq * widest * stat_bytes
    return (n * act_bytes + stats,
            f"(2*n*s*h + batch*s*E)*{act_bytes} B + 2*batch*s*max(h,q,i)*{stat_bytes} B: block inputs + outputs of "
            f"the set, one batch's block, a hook's copies of its widest input")


def calibration_flops(tokens: int, params: int) -> tuple[int, str]:
    return 2 * tokens * params, "2 x tokens x params (one forward; the estimator's own math not counted)"


def parse_size(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80*2**30, '512MB', '80' (GB) -> bytes."""
    t = text.strip().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "TB": 10**12, "GB": 10**9, "MB": 10**6, "T": 10**12,
             "G": 10**9, "M": 10**6}
    for u, f in units.items():
        if t.upper().endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, f = t, 10**9
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"--gpu-mem: {text!r} is not a size such as 80GB or 80GiB") from None
    if value <= 0:
        raise ValueError(f"--gpu-mem: {text!r} must be > 0")
    return int(value * f)


def human(n: int | None) -> str:
    """Bytes for people: 16.06 GB (decimal units, as GPU memory is sold)."""
    if n is None:
        return "unknown"
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"
