"""The comparison's outputs: one markdown table (``table.md``) and one plot (``compare.png``)."""
from __future__ import annotations

from pathlib import Path

from shear.eval.perplexity import protocol_line

_MB = 2**20


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown_table(rows: list, report: dict) -> str:
    """One row per model, grouped by budget; the protocol, KD recipe and machine as a header."""
    cfg, m = report["config"], report["machine"]
    kd = f"after KD ({cfg['kd_steps']} steps)" if cfg["kd_steps"] else None
    head = ["budget", "row", "params", "non-zero", "removed (non-zero)", "zero in block linears", "safetensors MB",
            "compressed MB", "PPL, no recovery"] + ([f"PPL, {kd}"] if kd else []) + ["prefill tok/s", "decode tok/s", "notes"]
    kernel = any(r.kernel_decode_tok_s is not None for r in rows)
    if kernel:
        head[-1:-1] = ["prefill tok/s, SparseLinear", "decode tok/s, SparseLinear"]
    dense = next(r for r in rows if r.kind == "dense")
    lines = [
        f"Held-out PPL: {protocol_line(report['ppl_protocol'])}. "
        + (f"KD: {cfg['kd_steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} tokens "
           f"({report['kd_tokens']:,} tokens, {cfg['source']} train split, same order for every row), "
           f"{cfg['ce_weight']} CE + {cfg['kd_weight']} forward KL (T={cfg['temperature']}) from the dense model, "
           f"lr {cfg['lr']:g}, full fine-tuning, masks kept. " if cfg["kd_steps"] else "")
        + f"Calibration: {cfg['n_samples']} x {cfg['seq_len']} tokens ({cfg['source']} train split, seed {cfg['seed']}), "
        "shared. "
        f"Speed: batch 1, prompt {cfg['prefill_tokens']}, {cfg['decode_tokens']} new tokens, {cfg['speed_rounds']} "
        f"interleaved rounds (median), {m['threads']} thread(s), {m['cpu']}, torch {m['torch']}; "
        "masked models run dense" + ("; SparseLinear columns: the same sparse models with their masked linears "
                                     "swapped by shear.kernels.to_sparse_linear_." if kernel else "."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if h in ("row", "notes") else "---:" for h in head) + "|",
    ]
    for r in rows:
        budget = "—" if r.budget is None else f"{r.budget:.0%}"
        cells = [budget, r.name, f"{r.params:,}", f"{r.nonzero:,}", f"{1 - r.nonzero / dense.nonzero:.1%}",
                 _f(r.linear_sparsity, ".1%"), _f(r.dense_bytes and r.dense_bytes / _MB, ".2f"),
                 _f(r.compressed_bytes and r.compressed_bytes / _MB, ".2f") + (f" ({r.compressed_format})"
                                                                             if r.compressed_format else ""),
                 _f(r.ppl, ".2f")] + ([_f(r.ppl_kd, ".2f")] if kd else []) + [
                 _f(r.prefill_tok_s, ",.0f"), _f(r.decode_tok_s, ",.0f")] + (
                 [_f(r.kernel_prefill_tok_s, ",.0f"), _f(r.kernel_decode_tok_s, ",.0f")] if kernel else []) + [
                 "; ".join(r.notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def smallest_bytes(row) -> int:
    """The smaller of the row's two on-disk forms (the dense one when it has no compressed form)."""
    return min(b for b in (row.dense_bytes, row.compressed_bytes) if b is not None)


def _styles(rows: list) -> dict[str, tuple[str, str]]:
    """(colour, marker) per row name (a variant keeps its style across budgets): blues for structured,
    reds for unstructured, green for N:M, black for dense."""
    palette = {"dense": (["black"], ["*"]), "structured": (["#1f4e8c", "#4f86c6", "#8fb8e8"], ["s", "D", "P", "X"]),
               "unstructured": (["#b22222", "#e9967a"], ["o", "h"]), "nm": (["#4c9a2a"], ["^"])}
    out: dict[str, tuple[str, str]] = {}
    for r in rows:
        if r.name not in out:
            n = sum(1 for k in out.values() if k[2] == r.kind)
            colours, markers = palette[r.kind]
            out[r.name] = (colours[n % len(colours)], markers[n % len(markers)], r.kind)
    return {k: v[:2] for k, v in out.items()}


def plot(rows: list, cfg, path: Path) -> Path:
    """PPL vs non-zero parameters (left) and vs bytes on disk of the smaller form (right); top: without
    recovery (log scale), bottom: after KD. One colour and marker per row kind and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = _styles(rows)
    kd = cfg.kd_steps > 0
    fig, axes = plt.subplots(2 if kd else 1, 2, figsize=(11, 7.6 if kd else 4.2), squeeze=False)
    xs = (("non-zero parameters", lambda r: r.nonzero), ("bytes on disk (smaller form), MB", lambda r: smallest_bytes(r) / _MB))
    panels = [("no recovery", lambda r: r.ppl, "log")] + ([(f"after {cfg.kd_steps} KD steps", lambda r: r.ppl_kd, "linear")]
                                                         if kd else [])
    for i, (title, y_of, scale) in enumerate(panels):
        for j, (xlabel, x_of) in enumerate(xs):
            ax = axes[i][j]
            for r in rows:
                colour, marker = style[r.name]
                ax.scatter([x_of(r)], [y_of(r)], color=colour, marker=marker, s=70 if marker == "*" else 45,
                           label=r.name, edgecolors="white", linewidths=0.5)
            ax.set_yscale(scale)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"held-out PPL, {title}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))  # one entry per variant
    axes[0][0].legend(seen.values(), seen.keys(), fontsize=7)
    fig.suptitle(f"structured vs unstructured vs {cfg.pattern or 'N:M'} at budgets "
                 f"{', '.join(f'{r:.0%}' for r in cfg.ratios)} of parameters removed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
