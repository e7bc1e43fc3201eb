"""FLAP allocations side by side: uniform vs global (per structure) vs pool (AL-AM), no recovery.

    OMP_NUM_THREADS=1 python tools/bench_allocation.py --model reference-quick --ratios 0.2 0.35 0.5

Same model, calibration (32 x 128 tokens of the train split, seed 0) and protocol (held-out
validation split as one token stream, non-overlapping 128-token windows, the first --ppl-windows)
for every row, in one run. Structures: heads (KV groups) + MLP channels, FLAP with bias compensation.
Prints a markdown table: PPL, removed share, and the attention/MLP split of what was removed.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from shear.data.text import calibration_ids
from shear.eval.perplexity import eval_text, load_eval_text
from shear.models import load_model, load_tokenizer
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ALLOCATIONS = ("uniform", "global", "pool")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference-quick")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--ppl-windows", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dense, tok = load_model(args.model), load_tokenizer(args.model)
    text = load_eval_text("shakespeare", "validation")
    ids = calibration_ids(tok, 32, 128, seed=0)

    def ppl(m):
        return eval_text(m, tok, text, seq_len=128, max_windows=args.ppl_windows, batch_size=8).ppl

    rows = [{"ratio": 0.0, "allocation": "dense", "ppl": ppl(dense), "removed": 0.0, "heads_kept": 1.0, "mlp_kept": 1.0}]
    for r in args.ratios:
        for alloc in ALLOCATIONS:
            m = copy.deepcopy(dense)
            cfg = PruneConfig(target={"ratio": r}, structures=["heads", "mlp"], allocation=alloc)
            _, _, rep = run_prune(m, tok, cfg, ImportanceConfig(estimator="flap"), ids=ids)
            wb, wa = rep["widths_before"], rep["widths_after"]
            rows.append({"ratio": r, "allocation": alloc, "ppl": ppl(m), "removed": rep["removed_ratio"],
                         "heads_kept": sum(wa["heads"]) / sum(wb["heads"]),
                         "mlp_kept": sum(wa["intermediate"]) / sum(wb["intermediate"])})
            print(json.dumps(rows[-1]), flush=True)
    print("\n" + benchlib.table(rows, [("ratio", "target", ".0%"), ("allocation", "allocation"), ("removed", "removed", ".1%"),
                                      ("heads_kept", "query heads kept", ".2f"), ("mlp_kept", "MLP channels kept", ".2f"),
                                      ("ppl", "held-out PPL", ".2f")], align="rlrrrr"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
