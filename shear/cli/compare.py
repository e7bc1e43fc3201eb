"""``shear compare MODEL --ratio R``: structured vs unstructured vs N:M at equal non-zero params and bytes.

    shear compare reference-quick --ratio 0.3 0.5 --kd-steps 150 -o runs/compare
    shear compare ~/models/llama --ratio 0.5 --structured obs:balanced flap_original:pool --kd-steps 0 -o runs/cmp

Outputs in OUT: table.md (one markdown table), compare.png (PPL vs non-zero params and vs bytes),
report.json (every number, the protocol and the machine); with --keep-models every row's exports
under OUT/models.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_compare(args) -> int:
    from shear.compare import CompareConfig, run_compare
    from shear.models import load_pretrained

    cfg = CompareConfig(ratios=args.ratio, structured=args.structured, method=args.method,
                        pattern=None if args.pattern == "none" else args.pattern, equal_bytes=not args.no_equal_bytes,
                        kd_steps=args.kd_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        n_samples=args.n_samples, source=args.source, eval_dataset=args.eval_dataset,
                        eval_windows=args.eval_windows or None,
                        speed_rounds=args.speed_rounds, prefill_tokens=args.prefill_tokens,
                        decode_tokens=args.decode_tokens, sparse_kernel=not args.no_sparse_kernel,
                        threads=args.threads, seed=args.seed,
                        keep_models=args.keep_models)
    out = Path(args.output_dir)
    if (out / "report.json").exists() and not args.overwrite:  # before any work
        raise FileExistsError(f"{out} already holds a comparison (report.json); --overwrite replaces it")
    model, tok = load_pretrained(args.model, trust_remote_code=args.trust_remote_code, finite=True)
    report = run_compare(model, tok, cfg, out)
    print((out / "table.md").read_text())
    print(f"table: {out / 'table.md'}; plot: {report['plot']}; report: {out / 'report.json'} ({report['wall_s']:.0f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="structured vs unstructured vs N:M at the same non-zero params (and bytes), "
                                       "without recovery and after the same KD: one table and one plot")
    p.add_argument("model", help="model directory, hub name, or a reference model name")
    p.add_argument("--ratio", type=float, nargs="+", required=True, help="budget(s): share of parameters removed")
    p.add_argument("-o", "--output-dir", required=True, help="OUT: table.md, compare.png, report.json")
    p.add_argument("--kd-steps", type=int, default=150, help="KD steps of every row (0: no recovery rows)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per KD block, calibration sequence, PPL window")
    p.add_argument("--batch-size", type=int, default=8, help="KD sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="KD peak learning rate")
    p.add_argument("--structured", nargs="+", default=["obs:balanced", "flap:uniform"],
                   help="structured rows, ESTIMATOR:ALLOCATION[:STRUCTURES] (e.g. obs:global, flap:global:heads+mlp+hidden); "
                        "the first sets the non-zero budget")
    p.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"],
                   help="unstructured and N:M rows")
    p.add_argument("--pattern", default="2:4", help="the N:M row ('none': no N:M row)")
    p.add_argument("--no-equal-bytes", action="store_true", help="skip the equal-bytes unstructured row")
    p.add_argument("--n-samples", type=int, default=32, help="calibration sequences (shared by every row)")
    p.add_argument("--source", default=None,
                   help="text for calibration and KD, train split: english, shakespeare, a file/dir or an HF dataset "
                        "(default: the text shear trained the model on, else english)")
    p.add_argument("--eval-dataset", default=None,
                   help="held-out text, validation split (default: the source's own when it is english or "
                        "shakespeare, else english; a local file is read whole)")
    p.add_argument("--eval-windows", type=int, default=200, help="held-out PPL windows (0: the whole validation split)")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved speed rounds")
    p.add_argument("--prefill-tokens", type=int, default=128, help="speed: prompt tokens (batch 1)")
    p.add_argument("--decode-tokens", type=int, default=32, help="speed: generated tokens (batch 1)")
    p.add_argument("--no-sparse-kernel", action="store_true",
                   help="do not also time sparse rows with shear.kernels' SparseLinear (timed when installed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for speed (default: as set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-models", action="store_true", help="keep every row's exports under OUT/models")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in OUT")
    p.add_argument("--trust-remote-code", action="store_true", help="run modeling code shipped in the model directory")
    p.set_defaults(func=_cmd_compare)
