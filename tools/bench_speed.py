"""CPU speedup of shear's default pruning (FLAP, KV groups + MLP, global) against the dense model.

    OMP_NUM_THREADS=1 python tools/bench_speed.py --model reference --ratios 0.2 0.35 0.5

Dense and pruned models are timed in alternation (dense, pruned, dense, pruned, ...) in one process
at batch 1, so a load change on the machine hits both; each cell is the median over rounds of the
pruned/dense rate ratio. Printed next to the ideal speedup (dense MACs / pruned MACs per token).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    a = ap.parse_args(argv)

    from shear.analyze import analyze
    from shear.eval.speed import measure_speed
    from shear.models import load_model, load_tokenizer
    from shear.prune.config import PruneConfig
    from shear.prune.pipeline import run_prune

    dense, tok = load_model(a.model), load_tokenizer(a.model)
    macs0 = analyze(dense).total_macs
    print(f"threads {torch.get_num_threads()}, prefill {a.prefill} tokens, decode {a.decode} tokens, batch 1\n")
    print("| removed | MAC ratio (ideal speedup) | prefill speedup | decode speedup |")
    print("|---|---|---|---|")
    for ratio in a.ratios:
        pruned, _, _ = run_prune(copy.deepcopy(dense), tok, PruneConfig(target={"ratio": ratio}))
        removed = 1 - sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in dense.parameters())
        pre, dec = [], []
        for _ in range(a.rounds):
            d = measure_speed(dense, a.prefill, a.decode, repeats=3, warmup=1)
            p = measure_speed(pruned, a.prefill, a.decode, repeats=3, warmup=1)
            pre.append(p["prefill_tok_s"] / d["prefill_tok_s"])
            dec.append(p["decode_tok_s"] / d["decode_tok_s"])
        mac = analyze(pruned).total_macs / macs0
        print(f"| {removed:.1%} | {mac:.3f} ({1 / mac:.2f}x) | {statistics.median(pre):.2f}x | "
              f"{statistics.median(dec):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
