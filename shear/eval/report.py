"""``evaluate(model, tokenizer, cfg)`` -> flat metrics dict, and rich tables comparing models.

Metric keys (all optional in a row, so rows from partial evaluations still print):
``params``, ``embedding_params``, ``non_embedding_params``, ``linear_macs_per_token``,
``attention_macs_per_token``, ``macs_per_token``, ``macs_context``, ``ppl``, ``ppl_protocol``
(dict), ``prefill_tok_s``, ``decode_tok_s``, ``speed`` (dict), ``tasks`` ({task: {metric: value}}),
``lm_eval_version``.
"""
from __future__ import annotations

import math

from shear.data.calibration import check_context
from shear.eval.config import EvalConfig
from shear.eval.perplexity import protocol_line

# (key, label, kind): kind picks the number format.
METRICS = [
    ("params", "params", "count"),
    ("non_embedding_params", "non-embedding params", "count"),
    ("linear_macs_per_token", "MACs/token (linear)", "count"),
    ("attention_macs_per_token", "MACs/token (attention @ctx)", "count"),
    ("ppl", "PPL", "float"),
    ("prefill_tok_s", "prefill tok/s (batch 1)", "rate"),
    ("decode_tok_s", "decode tok/s (batch 1)", "rate"),
]


def evaluate(model, tokenizer, cfg: EvalConfig | None = None, progress: bool = False, name: str = "model") -> dict:
    """Every metric ``cfg`` asks for, on one in-memory model (see the module docstring for keys).

    The model is put in eval mode for the measurements and given back in the mode it came in.
    Errors name the model as ``name``: a window longer than its context, a NaN/inf perplexity.
    """
    cfg = cfg or EvalConfig()
    check_causal(model, cfg, name)
    if cfg.perplexity:
        check_context(model, cfg.seq_len, f"{name}: eval seq_len")
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, tokenizer, cfg, progress, name)
    finally:
        model.train(was_training)


def check_causal(model, cfg: EvalConfig, name: str) -> None:
    """Perplexity, decode latency and lm-eval tasks measure next-token prediction: an encoder (BERT,
    a masked LM) is refused by name; parameters and MACs alone (no_ppl, no_speed) are measured."""
    if not (cfg.perplexity or cfg.speed or cfg.tasks) or not hasattr(model, "can_generate") or model.can_generate():
        return
    raise ValueError(f"{name}: {type(model).__name__} is an encoder, not a causal LM; perplexity, decode latency "
                     "and lm-eval tasks need next-token logits: evaluate it on its own task, or pass --no-ppl "
                     "--no-speed (eval.perplexity / eval.speed: false) for parameters and MACs only")


def _evaluate(model, tokenizer, cfg: EvalConfig, progress: bool, name: str) -> dict:
    from shear.eval.cost import count_params, macs_per_token

    out: dict = {}
    p = count_params(model)
    out.update(params=p["total"], embedding_params=p["embedding"], non_embedding_params=p["non_embedding"])
    ctx = cfg.macs_context or cfg.seq_len
    m = macs_per_token(model, seq_len=ctx)
    out.update(linear_macs_per_token=m["linear"], attention_macs_per_token=m["attention"],
               macs_per_token=m["total"], macs_context=ctx)
    if cfg.perplexity:
        from shear.eval.perplexity import eval_text, load_eval_text

        text = load_eval_text(cfg.dataset, cfg.split, cfg.text_field, cfg.dataset_config)
        proto = {"dataset": cfg.dataset if not cfg.dataset_config else f"{cfg.dataset}/{cfg.dataset_config}",
                 "split": cfg.split}
        r = eval_text(model, tokenizer, text, cfg.seq_len, cfg.effective_stride, cfg.batch_size,
                      cfg.max_windows, proto, progress)
        if not math.isfinite(r.ppl):
            raise FloatingPointError(f"{name}: perplexity is {r.ppl} ({r.protocol_line()}); the model's logits "
                                     "are not finite or it assigns ~0 probability to the text: check its weights")
        out.update(ppl=r.ppl, nll=r.nll, ppl_protocol=r.protocol)
    if cfg.speed:
        from shear.eval.speed import measure_speed

        s = measure_speed(model, cfg.prefill_tokens, cfg.decode_tokens, cfg.repeats, cfg.warmup, cfg.num_threads)
        out.update(prefill_tok_s=s["prefill_tok_s"], decode_tok_s=s["decode_tok_s"], speed=s)
    if cfg.tasks:
        from shear.eval.lm_eval_bridge import run_tasks

        t = run_tasks(model, tokenizer, cfg.tasks, cfg.task_include_path, cfg.task_limit)
        out.update(tasks=t["tasks"], lm_eval_version=t["lm_eval_version"])
    return out


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if kind == "count":
        for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(v) >= div:
                return f"{v / div:.3f} {unit}"
        return f"{v:,}"
    if kind == "rate":
        return f"{v:,.1f}"
    if kind == "acc":
        return f"{v:.4f}"
    return f"{v:.3f}"


def _rows_of(rows: dict[str, dict]) -> list[tuple[str, str, str]]:
    """The (key path, label, kind) rows present in any model's metrics, tasks flattened."""
    spec = [(k, label, kind) for k, label, kind in METRICS if any(k in r for r in rows.values())]
    seen: list[tuple[str, str]] = []
    for r in rows.values():
        for task, metrics in r.get("tasks", {}).items():
            for name in metrics:
                if not name.endswith("stderr") and name != "samples" and (task, name) not in seen:
                    seen.append((task, name))
    spec += [(f"tasks/{t}/{n}", f"{t} {n}", "acc") for t, n in seen]
    return spec


def _get(r: dict, key: str):
    if key.startswith("tasks/"):
        _, task, name = key.split("/", 2)
        return r.get("tasks", {}).get(task, {}).get(name)
    return r.get(key)


def compare_table(rows: dict[str, dict], title: str | None = None, with_caption: bool = True):
    """A rich Table: one column per model, then one ratio column per later model (value / first model).

    ``rows``: ``{"dense": metrics, "pruned": metrics, ...}`` as returned by :func:`evaluate`.
    The PPL protocol(s) and the context of the attention MACs go into the caption (see
    :func:`caption`; pass ``with_caption=False`` to print those lines unwrapped yourself).
    """
    from rich.table import Table

    names = list(rows)
    if not names:
        raise ValueError("compare_table: no rows")
    t = Table(title=title)
    t.add_column("metric")
    for n in names:
        t.add_column(n, justify="right")
    for n in names[1:]:
        t.add_column(f"{n} / {names[0]}", justify="right")
    for key, label, kind in _rows_of(rows):
        vals = [_get(rows[n], key) for n in names]
        cells = [_fmt(v, kind) for v in vals]
        base = vals[0]
        for v in vals[1:]:
            cells.append(f"{v / base:.3f}x" if v is not None and base not in (None, 0) else "—")
        t.add_row(label, *cells)
    if with_caption:
        t.caption = caption(rows)
    return t


def caption(rows: dict[str, dict]) -> str:
    """Protocol lines: PPL protocol(s), MACs context, speed settings, lm-eval version."""
    lines = []
    protos = {n: protocol_line(r["ppl_protocol"]) for n, r in rows.items() if r.get("ppl_protocol")}
    if len(set(protos.values())) == 1:
        lines.append(f"PPL protocol: {next(iter(protos.values()))}")
    else:
        lines += [f"PPL protocol ({n}): {p}" for n, p in protos.items()]
    ctx = {r.get("macs_context") for r in rows.values()} - {None}
    if ctx:
        lines.append(f"attention MACs at context {', '.join(map(str, sorted(ctx)))}")
    sp = next((r["speed"] for r in rows.values() if r.get("speed")), None)
    if sp:
        lines.append(f"speed: CPU, {sp['threads']} threads, prefill {sp['prefill_tokens']} tokens, decode "
                     f"{sp['decode_tokens']} tokens greedy with KV cache, median of {sp['repeats']}")
    ver = {r.get("lm_eval_version") for r in rows.values()} - {None}
    if ver:
        lines.append(f"lm-eval {', '.join(sorted(ver))}, zero-shot")
    return "\n".join(lines)
