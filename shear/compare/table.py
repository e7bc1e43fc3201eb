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


def plot(rows: list, cfg, path: Path) -> Path:
    """PPL vs non-zero parameters (left) and vs bytes on disk of the smaller form (right); hollow markers
    without recovery, filled after KD, one colour and marker per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("black", "*"), "structured": ("#3b6ea8", "s"), "unstructured": ("#c0504d", "o"),
             "nm": ("#9bbb59", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, xlabel, x_of in ((axes[0], "non-zero parameters", lambda r: r.nonzero),
                             (axes[1], "bytes on disk (smaller form), MB", lambda r: smallest_bytes(r) / _MB)):
        for r in rows:
            colour, marker = style[r.kind]
            x = x_of(r)
            ax.scatter([x], [r.ppl], facecolors="none", edgecolors=colour, marker=marker, s=60)
            if r.ppl_kd is not None:
                ax.scatter([x], [r.ppl_kd], color=colour, marker=marker, s=60)
                ax.plot([x, x], [r.ppl, r.ppl_kd], color=colour, lw=0.6, alpha=0.5)
            label = r.name.replace("structured ", "").replace("unstructured ", "")
            ax.annotate(label if r.budget is None else f"{r.budget:.0%} {label}", (x, r.ppl_kd or r.ppl),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out PPL")
    for kind, (colour, marker) in style.items():
        axes[0].scatter([], [], color=colour, marker=marker, label={"nm": cfg.pattern or "N:M"}.get(kind, kind))
    axes[0].scatter([], [], facecolors="none", edgecolors="grey", marker="o", label="no recovery (hollow)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"structured vs unstructured vs {cfg.pattern or 'N:M'}"
                 + (f"; filled: after {cfg.kd_steps} KD steps" if cfg.kd_steps else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
