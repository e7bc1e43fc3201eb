"""Expert pruning on a tiny Mixtral trained here on the shipped Shakespeare corpus: 25% and 50% of every layer's
experts removed by each criterion (shear/importance/experts.py) against random, and 25% / 50% of every
expert's intermediate channels by each channel criterion (shear/importance/expert_channels.py) against
random; held-out PPL, no recovery.

    OMP_NUM_THREADS=2 python tools/bench_moe.py --out runs/bench-moe              # ~7 min on 2 busy cores
    OMP_NUM_THREADS=1 python tools/bench_moe.py --out runs/bench-moe-smoke --steps 20 --windows 8 --seeds 1

Model: Mixtral with the toy teacher's tokenizer (shipped reference-teacher, BPE 2048): hidden 128, 4 layers,
4 query / 2 KV heads, 8 experts of intermediate 128, top-2, trained from scratch for ``--steps`` steps
(batch 16 x 128 tokens, AdamW 3e-3 cosine, router load-balancing loss ``--aux``) on the corpus's train split.
Calibration: 32 x 128 tokens of the train split (what the resolver gives the reference models' corpus).
Evaluation: the toy protocol of docs/BENCHMARKS.md, held-out Shakespeare (macbeth + tempest) as one stream,
non-overlapping 128-token windows, the first ``--windows``. Random is the mean over ``--seeds`` seeds
(min-max beside it). The unpruned model is the control row.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

CRITERIA = ("frequency", "weighted", "reconstruction")
#: channel rows: (label, criterion, routing_weight)
CHANNEL_ROWS = (("wanda (routing-weighted)", "wanda", True), ("wanda (unweighted)", "wanda", False),
                ("flap (routing-weighted)", "flap", True), ("magnitude (weights only)", "magnitude", True))


def build(tok, aux: float):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=False,
                        router_aux_loss_coef=aux, output_router_logits=True, use_cache=False,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg)


def train(model, tok, steps: int, batch: int = 16, lr: float = 3e-3) -> list[float]:
    from shear.data.text import DataConfig, build_datasets

    data, _ = build_datasets(DataConfig(source="shakespeare", seq_len=128), tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        ids = torch.stack([data[i]["input_ids"] for i in idx])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {out.loss.item():.3f}", flush=True)
    model.config.output_router_logits = False
    return losses


def ppl(model, tok, windows: int) -> float:
    from shear.eval.perplexity import eval_text, load_eval_text

    model.eval()
    return eval_text(model, tok, load_eval_text("shakespeare", "validation"), seq_len=128, max_windows=windows,
                     batch_size=8).ppl


def pruned_ppl(model, tok, ids, ratio: float, criterion: str, seed: int, windows: int) -> tuple[float, dict]:
    from shear.prune.experts import ExpertPruneConfig, prune_experts_

    m = copy.deepcopy(model)
    rep = prune_experts_(m, tok, ExpertPruneConfig(ratio=ratio, criterion=criterion, seed=seed), ids=ids)
    return ppl(m, tok, windows), rep


def channel_ppl(model, tok, ids, ratio: float, criterion: str, weighted: bool, seed: int,
                windows: int) -> tuple[float, dict]:
    from shear.prune.expert_channels import ExpertChannelConfig, prune_expert_channels_

    m = copy.deepcopy(model)
    rep = prune_expert_channels_(m, tok, ExpertChannelConfig(ratio=ratio, criterion=criterion,
                                                             routing_weight=weighted, seed=seed), ids=ids)
    return ppl(m, tok, windows), rep


def channel_rows(model, tok, ids, args) -> tuple[list[dict], dict]:
    """Expert-channel rows at 25% and 50%: each criterion, then random (mean over ``args.seeds``)."""
    rows, fallback = [], {}
    for ratio in (0.25, 0.5):
        for label, crit, weighted in CHANNEL_ROWS:
            p, rep = channel_ppl(model, tok, ids, ratio, crit, weighted, 0, args.windows)
            fallback[f"{label}@{ratio}"] = rep["fallback_experts"]
            rows.append({"row": label, "channels": rep["channels_after"], "params": rep["params_after"], "ppl": p})
        rand = [channel_ppl(model, tok, ids, ratio, "random", True, s, args.windows)[0] for s in range(args.seeds)]
        rows.append({"row": f"random (mean of {args.seeds}; {min(rand):.2f}-{max(rand):.2f})",
                     "channels": rows[-1]["channels"], "params": rows[-1]["params"], "ppl": sum(rand) / len(rand)})
    return rows, fallback


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--aux", type=float, default=0.05, help="router load-balancing loss coefficient")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the random control")
    args = ap.parse_args(argv)
    from shear.data.calibration import calibration_for
    from shear.models import load_tokenizer, resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(resolve_model_path("reference-teacher"))
    model = build(tok, args.aux)
    t0 = time.perf_counter()
    losses = train(model, tok, args.steps)
    t_train = time.perf_counter() - t0
    ids, line = calibration_for(model, tok, source="shakespeare", seed=0)
    rows = [{"row": "unpruned (control)", "experts": 8, "params": sum(p.numel() for p in model.parameters()),
             "ppl": ppl(model, tok, args.windows)}]
    reports = {}
    for ratio in (0.25, 0.5):
        for crit in CRITERIA:
            p, rep = pruned_ppl(model, tok, ids, ratio, crit, 0, args.windows)
            reports[f"{crit}@{ratio}"] = rep["layers"]
            rows.append({"row": crit, "experts": rep["experts_after"], "params": rep["params_after"], "ppl": p})
        rand = [pruned_ppl(model, tok, ids, ratio, "random", s, args.windows)[0] for s in range(args.seeds)]
        rows.append({"row": f"random (mean of {args.seeds}; {min(rand):.2f}-{max(rand):.2f})",
                     "experts": 8 - math.floor(ratio * 8), "params": rows[-1]["params"], "ppl": sum(rand) / len(rand)})
    md = benchlib.table(rows, [("row", "criterion"), ("experts", "experts / layer"), ("params", "params", ","),
                               ("ppl", "held-out PPL", ".2f")])
    crow, fallback = channel_rows(model, tok, ids, args)
    control = dict(rows[0], channels=model.config.intermediate_size)
    md += "\n\n" + benchlib.table([control] + crow, [("row", "channel criterion"), ("channels", "channels / expert"),
                                                     ("params", "params", ","), ("ppl", "held-out PPL", ".2f")])
    head = (f"tiny Mixtral (8 experts, top-2), {args.steps} steps, aux loss {args.aux} ({t_train:.0f} s, final "
            f"loss {losses[-1]:.3f}); calibration {line}; {args.windows} windows x 128; {benchlib.machine_line()}")
    print(head + "\n\n" + md)
    (out / "table.md").write_text(head + "\n\n" + md + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "channel_rows": crow, "channel_fallback": fallback,
                                                  "losses": losses, "layers": reports,
                                                  "machine": benchlib.machine()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
