"""Structured OBS vs FLAP with bias compensation, no recovery, same calibration and protocol, one run.

    OMP_NUM_THREADS=1 python tools/bench_obs.py --model reference-quick --ratios 0.35 0.5

Every row prunes a fresh copy of the same model (heads as KV groups + MLP channels) with the same
calibration ids (32 x 128 tokens of the train split, seed 0) and is scored by the same protocol as
tools/bench_allocation.py (held-out validation split as one token stream, non-overlapping 128-token
windows, the first --ppl-windows). Methods at each ratio:

- ``flap`` + bias compensation, ``global`` allocation (shear's default) and ``pool`` (FLAP's AL-AM);
- ``obs`` (greedy OBS scores + layer-sequential refit of the kept columns and of a bias where
  compensation would put one), ``global`` and ``pool`` (standardized scores);
- with --ablation, OBS's global plan (the same units removed) finished without the refit: sliced as
  is, and with FLAP's mean compensation biases instead (what the plan alone buys, and what the
  refit buys over FLAP's biases).

Prints a markdown table (PPL, removed share, heads / MLP channels kept, seconds) and, with --out, JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from shear.data.text import calibration_ids
from shear.eval.perplexity import eval_text, load_eval_text
from shear.importance import ESTIMATORS
from shear.models import load_model, load_tokenizer
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

#: (label, estimator, allocation, standardize, finish); finish: "own" (FLAP: mean biases; OBS: the refit),
#: "slice" (OBS plan, the refit replaced by nothing), "flap" (OBS plan, FLAP's mean biases instead of the refit)
METHODS = (("FLAP + compensation", "flap", "global", None, "own"),
           ("FLAP + compensation", "flap", "pool", None, "own"),
           ("OBS", "obs", "global", None, "own"),
           ("OBS", "obs", "pool", True, "own"))
ABLATION = (("OBS plan, sliced (no refit)", "obs", "global", None, "slice"),
            ("OBS plan + FLAP compensation (no refit)", "obs", "global", None, "flap"))


def prune_row(dense, tok, ids, ratio: float, est: str, alloc: str, std, finish: str):
    """Prune a copy of ``dense``; for the ablations the estimator's reconstruct hook is swapped for the
    run (the plan is the same: scores, and the bias parameters it budgets for, do not depend on it)."""
    m = copy.deepcopy(dense)
    cfg = PruneConfig(target={"ratio": ratio}, structures=["heads", "mlp"], allocation=alloc)
    icfg = ImportanceConfig(estimator=est, standardize=std, bias_compensation=True if finish == "flap" else None)
    hook = ESTIMATORS[est].reconstruct
    if finish == "slice":
        ESTIMATORS[est].reconstruct = lambda *a, **k: {}  # biases budgeted, none written: plain slicing
    elif finish == "flap":
        ESTIMATORS[est].reconstruct = None
    try:
        t0 = time.time()
        _, _, rep = run_prune(m, tok, cfg, icfg, ids=ids)
        return m, rep, time.time() - t0
    finally:
        ESTIMATORS[est].reconstruct = hook


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference-quick")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.35, 0.5])
    ap.add_argument("--ppl-windows", type=int, default=200)
    ap.add_argument("--ablation", action="store_true", help="also OBS's plan sliced without reconstruction")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dense, tok = load_model(args.model), load_tokenizer(args.model)
    dense.float().eval()
    text = load_eval_text("shakespeare", "validation")
    ids = calibration_ids(tok, 32, 128, seed=0)

    def ppl(m):
        return eval_text(m, tok, text, seq_len=128, max_windows=args.ppl_windows, batch_size=8).ppl

    rows = [{"ratio": 0.0, "method": "dense", "allocation": "", "ppl": ppl(dense), "removed": 0.0,
             "heads_kept": 1.0, "mlp_kept": 1.0, "seconds": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for r in args.ratios:
        for label, est, alloc, std, finish in METHODS + (ABLATION if args.ablation else ()):
            m, rep, sec = prune_row(dense, tok, ids, r, est, alloc, std, finish)
            wb, wa = rep["widths_before"], rep["widths_after"]
            rows.append({"ratio": r, "method": label, "allocation": alloc, "ppl": ppl(m),
                         "removed": rep["removed_ratio"], "heads_kept": sum(wa["heads"]) / sum(wb["heads"]),
                         "mlp_kept": sum(wa["intermediate"]) / sum(wb["intermediate"]), "seconds": sec})
            print(json.dumps(rows[-1]), flush=True)
    print("\n" + benchlib.table(rows, [("ratio", "target", ".0%"), ("method", "method"), ("allocation", "allocation"),
                                      ("removed", "removed", ".1%"), ("heads_kept", "query heads kept", ".2f"),
                                      ("mlp_kept", "MLP channels kept", ".2f"), ("seconds", "prune s", ".1f"),
                                      ("ppl", "held-out PPL", ".2f")], align="rllrrrrr"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
