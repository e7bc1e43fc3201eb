"""Pruning quality/cost benchmark: every shear estimator vs Torch-Pruning, same model, same run.

    OMP_NUM_THREADS=2 python tools/bench_prune.py --model ~/.cache/shear/models/reference \
        --out runs/bench_prune.json --md runs/bench_prune.md

Protocol: held-out PPL on the embedded corpus's validation split, one token stream, non-overlapping
windows of 256 tokens (255 scored each), the first ``--ppl-windows`` windows; no recovery training.
Calibration: 32 x 128-token windows of the train split (seed 0), shared by every method that uses data.
Section A (GQA model): MLP + hidden channels only, because Torch-Pruning 1.6.1 hangs on GQA attention
groups (VainF/Torch-Pruning#527): its q/k/v projections are passed as ignored layers. Section B: an MHA
variant (KV heads repeated to one per query head: identical function) where both prune heads, MLP
and hidden. Torch-Pruning runs its BasePruner with GroupMagnitudeImportance(p=2, mean) and
GroupTaylorImportance at the channel fraction shear's uniform plan solved for the same parameter
ratio (its actual parameter count is reported next to ours). Speed: batch-1 CPU prefill (128 tokens)
and decode (32 tokens) of the pruned model vs the dense one, next to the MAC ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from shear.eval.perplexity import eval_text, load_eval_text
from shear.models import load_model, load_tokenizer
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import PeakMemory, run_prune

ESTIMATORS = ["magnitude_l1", "magnitude_l2", "taylor_vector", "taylor_element1", "taylor_element2", "wanda_sp",
              "flap", "minitron", "random"]


def to_mha(model):
    """The same function with one KV head per query head (k/v rows repeated, as ``repeat_kv`` does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    H, K = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    new = LlamaForCausalLM(LlamaConfig(**{**c.to_dict(), "num_key_value_heads": H})).eval()
    sd = model.state_dict()
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = sd[k].view(K, D, -1).repeat_interleave(H // K, dim=0).reshape(H * D, -1)
    new.load_state_dict(sd)
    return new


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def tp_prune(model, ids, importance: str, ratio: float, round_to: int, heads: bool):
    """Torch-Pruning's LLM path (BasePruner, uniform), on a copy; returns (model, seconds)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    c = m.config
    attn = [mod for n, mod in m.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
    kw = {}
    if heads:
        num_heads = {}
        for layer in m.model.layers:
            a = layer.self_attn
            for p in (a.q_proj, a.k_proj, a.v_proj):
                num_heads[p] = c.num_attention_heads
        kw = dict(num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
    ignored = [m.lm_head] + ([] if heads else attn)
    imp = (tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean") if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    t0 = time.time()
    if importance == "taylor":
        for b in ids.split(8):
            m(input_ids=b, labels=b, use_cache=False).loss.backward()
    pruner = tp.pruner.BasePruner(m, example_inputs={"input_ids": ids[:1], "use_cache": False}, importance=imp,
                                  pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
                                  global_pruning=False, output_transform=lambda o: o.logits, **kw)
    for g in pruner.step(interactive=True):
        g.prune()
    m.zero_grad(set_to_none=True)
    m.config.hidden_size = m.model.embed_tokens.weight.shape[1]
    m.config.intermediate_size = m.model.layers[0].mlp.gate_proj.out_features
    if heads:
        D = m.config.head_dim
        h = m.model.layers[0].self_attn.q_proj.out_features // D
        m.config.num_attention_heads = m.config.num_key_value_heads = h
    return m.eval(), time.time() - t0


def macs(m) -> int:
    from shear.analyze import analyze

    return analyze(m).total_macs


def speed(m, reps: int) -> dict:
    from shear.eval.speed import measure_speed

    return measure_speed(m, prefill_tokens=128, decode_tokens=32, repeats=reps, warmup=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--estimators", nargs="+", default=ESTIMATORS)
    ap.add_argument("--default", default="flap", help="estimator whose pruned models get speed-measured")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--ppl-seq", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=48)
    ap.add_argument("--speed-reps", type=int, default=5)
    ap.add_argument("--no-mha", action="store_true")
    ap.add_argument("--no-gqa-heads", action="store_true", help="skip section C (shear on GQA heads + MLP)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default="runs/bench_prune.json")
    args = ap.parse_args(argv)

    from shear.data.text import calibration_ids

    base, tok = load_model(args.model), load_tokenizer(args.model)
    text = load_eval_text("shakespeare", "validation")
    ids = calibration_ids(tok, args.n_calib, args.calib_len, seed=0)

    def ppl(m) -> float:
        with torch.no_grad():
            return eval_text(m, tok, text, seq_len=args.ppl_seq, max_windows=args.ppl_windows, batch_size=8).ppl

    rows, dense_speed = [], {}
    P0 = {"gqa": n_params(base)}
    dense = {"gqa": ppl(base)}
    if not args.no_speed:
        dense_speed["gqa"] = speed(base, args.speed_reps)
    macs0 = {"gqa": macs(base)}
    print(f"dense GQA: {P0['gqa']:,} params, PPL {dense['gqa']:.3f}", flush=True)

    def add(section, method, alloc, ratio, m, wall, peak_mb, base_key, do_speed):
        row = dict(section=section, method=method, allocation=alloc, target=ratio, params=n_params(m),
                   removed=1 - n_params(m) / P0[base_key], ppl=ppl(m), wall_s=round(wall, 2),
                   peak_rss_delta_mb=peak_mb, mac_ratio=macs(m) / macs0[base_key])
        if do_speed and not args.no_speed:
            s = speed(m, args.speed_reps)
            d = dense_speed[base_key]
            row.update(prefill_speedup=s["prefill_tok_s"] / d["prefill_tok_s"],
                       decode_speedup=s["decode_tok_s"] / d["decode_tok_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    def shear_rows(section, model, structures, base_key, ests, heads="kv_group"):
        fractions = {}
        for ratio in args.ratios:
            for alloc in ("uniform", "global"):
                for est in ests:
                    m = copy.deepcopy(model)
                    cfg = PruneConfig(target={"ratio": ratio}, structures=structures, allocation=alloc,
                                      round_to=args.round_to, heads=heads)
                    m, plan, rep = run_prune(m, tok, cfg, ImportanceConfig(estimator=est), ids=ids)
                    if alloc == "uniform":
                        fractions[ratio] = plan.meta["fraction"]
                    add(section, f"shear {est}", alloc, ratio, m, rep["time_s"]["scoring"],
                        round(rep["peak_rss_mb"] - rep["rss_start_mb"], 1), base_key, est == args.default)
                    del m
        return fractions

    def tp_rows(section, model, base_key, fractions, heads):
        for ratio in args.ratios:
            for imp in ("magnitude", "taylor"):
                with PeakMemory() as mem:
                    m, wall = tp_prune(model, ids, imp, fractions[ratio], args.round_to, heads)
                add(section, f"Torch-Pruning {imp}", "uniform", ratio, m, wall,
                    round((mem.peak - mem.start) / 2**20, 1), base_key, imp == "magnitude")
                del m

    fr = shear_rows("A: GQA, MLP+hidden", base, ["mlp", "hidden"], "gqa", args.estimators)
    tp_rows("A: GQA, MLP+hidden", base, "gqa", fr, heads=False)
    if not args.no_gqa_heads:  # shear only: Torch-Pruning cannot prune GQA attention
        ests = [e for e in args.estimators if e in ("magnitude_l2", "taylor_vector", "flap", "wanda_sp", "minitron",
                                                      "random", args.default)]
        shear_rows("C: GQA, KV groups+MLP (shear only)", base, ["heads", "mlp"], "gqa", ests)
    if not args.no_mha:
        mha = to_mha(base)
        P0["mha"], macs0["mha"], dense["mha"] = n_params(mha), macs(mha), ppl(mha)
        if not args.no_speed:
            dense_speed["mha"] = speed(mha, args.speed_reps)
        print(f"dense MHA: {P0['mha']:,} params, PPL {dense['mha']:.3f}", flush=True)
        ests = [e for e in args.estimators if e in ("magnitude_l2", "taylor_vector", "taylor_element1", "flap",
                                                      "wanda_sp", "minitron", "random", args.default)]
        fr = shear_rows("B: MHA, heads+MLP+hidden", mha, ["heads", "mlp", "hidden"], "mha", ests)
        tp_rows("B: MHA, heads+MLP+hidden", mha, "mha", fr, heads=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=args.model, dense_ppl=dense, dense_params=P0, dense_speed=dense_speed, argv=sys.argv,
                torch=torch.__version__, threads=torch.get_num_threads(),
                protocol=f"shakespeare validation, seq {args.ppl_seq}, non-overlapping, first {args.ppl_windows} windows; "
                         f"calibration {args.n_calib} x {args.calib_len} train tokens, seed 0")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
