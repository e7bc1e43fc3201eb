"""``shear eval MODEL_DIR [--vs ORIGINAL] [--tasks t1,t2] [--seq-len N] [--stride N] [--max-windows N] [--json OUT]``

Loads a saved HF model directory (and optionally a second one to compare against), measures
parameters, MACs/token, perplexity under a printed protocol, CPU latency, and lm-eval tasks, and
prints one table (side by side with model/original ratios when ``--vs`` is given).
"""
from __future__ import annotations

import json
from pathlib import Path

from shear.eval.config import EvalConfig


def load_model(model_dir: str, dtype: str = "float32", trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a saved directory (or a reference name) through ``shear.models``:
    a directory with its own modeling file (``auto_map``) needs ``trust_remote_code``."""
    from shear.models import load_pretrained

    return load_pretrained(model_dir, dtype, trust_remote_code)


def config_from_args(args) -> EvalConfig:
    """EvalConfig from parsed CLI args (only the options given override the defaults)."""
    kw = dict(dataset=args.dataset, split=args.split, seq_len=args.seq_len, stride=args.stride,
              max_windows=args.max_windows, batch_size=args.batch_size, prefill_tokens=args.prefill_tokens,
              decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
              task_include_path=args.include_path, task_limit=args.limit, vs=args.vs)
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.tasks:
        kw["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_speed:
        kw["speed"] = False
    if args.no_ppl:
        kw["perplexity"] = False
    return EvalConfig(**kw)


def run(args) -> int:
    """Evaluate MODEL_DIR (and --vs), print the table, optionally write JSON."""
    from rich.console import Console

    from shear.eval.report import caption, compare_table, evaluate

    cfg = config_from_args(args)
    if cfg.tasks:
        from shear.eval import lm_eval_bridge

        if not lm_eval_bridge.lm_eval_available():
            raise ValueError(f"--tasks: {lm_eval_bridge.MISSING_MESSAGE}")
    console = Console()
    targets = ([("original", cfg.vs)] if cfg.vs else []) + [("model", args.model_dir)]
    rows: dict[str, dict] = {}
    for name, path in targets:
        console.print(f"[bold]{name}[/bold]: {path}")
        model, tok = load_model(path, args.dtype, args.trust_remote_code)
        rows[name] = {**evaluate(model, tok, cfg, progress=True, name=str(path)), "path": str(path)}
        del model
    console.print(compare_table(rows, title="shear eval", with_caption=False))
    console.print(caption(rows), soft_wrap=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": cfg.model_dump(), "models": rows}, indent=2, default=str))
        console.print(f"metrics written to {out}", soft_wrap=True)
    return 0


def register(subparsers) -> None:
    """Add the ``eval`` subcommand."""
    d = EvalConfig()
    p = subparsers.add_parser("eval", help="perplexity, params, MACs/token, CPU latency (and lm-eval tasks) of a model dir",
                              description=__doc__.splitlines()[0])
    p.add_argument("model_dir", metavar="MODEL_DIR", help="saved HF model directory (config, safetensors, tokenizer)")
    p.add_argument("--vs", metavar="ORIGINAL", help="second model directory; adds ratio columns model/original")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, zero-shot (needs: pip install 'shear[eval]')")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="at most N examples per lm-eval task (testing only)")
    p.add_argument("--dataset", help=f"perplexity text: 'shakespeare', a .txt/.jsonl file, a directory of them or "
                                     f"HF dataset (default {d.dataset})")
    p.add_argument("--split", help=f"split to score (default {d.split})")
    p.add_argument("--seq-len", type=int, help=f"tokens per window (default {d.seq_len})")
    p.add_argument("--stride", type=int, help="step between windows (default: seq-len, non-overlapping)")
    p.add_argument("--max-windows", type=int, help="score at most N windows (default: all)")
    p.add_argument("--batch-size", type=int, help=f"windows per forward (default {d.batch_size})")
    p.add_argument("--prefill-tokens", type=int, help=f"prompt length for latency (default {d.prefill_tokens})")
    p.add_argument("--decode-tokens", type=int, help=f"generated tokens for latency (default {d.decode_tokens})")
    p.add_argument("--repeats", type=int, help=f"timed repeats, median reported (default {d.repeats})")
    p.add_argument("--warmup", type=int, help=f"untimed warmup repeats (default {d.warmup})")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype when loading (default float32)")
    p.add_argument("--json", metavar="OUT", help="also write all metrics and the config to this JSON file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped in a model directory (per-layer pruned exports carry auto_map)")
    p.set_defaults(func=run)
