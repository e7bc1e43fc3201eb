"""Learned masks vs one-shot pruning, and dynamic vs static domain weights, at one token budget.

    OMP_NUM_THREADS=1 python tools/bench_shearing.py --model reference-teacher --ratio 0.5 --steps 400 --learn-steps 150 --out runs/bench-shearing

Part 1 (pruning): every row ends at the same parameter budget (``--ratio`` of the parameters removed)
and has spent the same training tokens (``--steps`` x batch x seq_len), all with KD from the dense
model (forward KL, T = 1) and the same data order:
  - one-shot rows ``ESTIMATOR:ALLOCATION:STRUCTURES``: prune once, then ``--steps`` steps of KD;
  - learned rows ``learned:STRUCTURES``: ``--learn-steps`` steps of mask learning (masks and weights,
    KD), masks fixed to the exact top-k and sliced, then ``--steps - --learn-steps`` steps of KD;
  - control: the dense model trained on the same tokens (CE).
Part 2 (domains, ``--domain-row``, a one-shot row spec): the shipped corpus split by genre (comedies,
histories, tragedies, poems); one pruned model recovered by KD with three samplers at the same budget:
natural proportions (static), uniform (static), dynamic batch loading from uniform (eta ``--eta``,
reference losses = the dense teacher's held-out loss per genre). Per-genre held-out PPL table, and a
plot of the dynamic weights over steps.
Held-out PPL everywhere: the held-out works of the corpus (shear's eval_text, seq 128, stride 128);
per genre: the genre's held-out blocks (the last 5% of each of its works, never trained on).
Writes OUT/table.md, OUT/rows.json, OUT/domain_weights.png, OUT/domain_ppl.png, and per learned row
OUT/learned-STRUCTURES-report/mask_sizes.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference-teacher")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of parameters removed")
    ap.add_argument("--steps", type=int, default=400, help="training steps of every row (mask learning included)")
    ap.add_argument("--learn-steps", type=int, default=150, help="of --steps: mask learning in learned rows")
    ap.add_argument("--learn-warmup", type=int, default=None, help="target ramp steps (default: 20%% of --learn-steps)")
    ap.add_argument("--mask-lr", type=float, default=0.1)
    ap.add_argument("--lambda-lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rows", default="control,flap:global:heads+mlp,flap:global:heads+mlp+hidden,"
                                      "flap:uniform:heads+mlp+hidden,learned:heads+mlp+hidden,learned:heads+mlp")
    ap.add_argument("--domain-row", default="flap:global:heads+mlp+hidden", help="pruned model of part 2 ('' = skip)")
    ap.add_argument("--eta", type=float, default=1.0, help="dynamic batch loading step size")
    ap.add_argument("--eval-every", type=int, default=50, help="evaluations (and domain-weight updates) every N steps")
    ap.add_argument("--ppl-windows", type=int, default=0, help="held-out windows (0 = all)")
    ap.add_argument("--out", default="runs/bench-shearing")
    a = ap.parse_args(argv)

    from shear.data.domains import DomainMix, build_domain_datasets, domain_loss, genre_domains, plot_weights
    from shear.data.text import DataConfig, build_datasets
    from shear.eval.perplexity import eval_text, load_eval_text
    from shear.models import load_model, load_tokenizer
    from shear.prune.config import ImportanceConfig, LearnConfig, PruneConfig
    from shear.prune.pipeline import run_prune
    from shear.shearing.learn import learn_masks
    from shear.train.config import DistillConfig, TrainConfig
    from shear.train.trainer import train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, dense = load_tokenizer(a.model), load_model(a.model).eval()
    train_ds, val_ds = build_datasets(DataConfig(source="shakespeare", seq_len=a.seq_len), tok)
    held_out = load_eval_text("shakespeare", "validation")
    domains = genre_domains()
    dom_train, dom_val = build_domain_datasets(domains, tok, a.seq_len)
    kd = DistillConfig(ce_weight=0.0, kd_weight=1.0)
    protocol: dict = {}

    def ppl(m) -> float:
        r = eval_text(m.eval(), tok, held_out, a.seq_len, a.seq_len, batch_size=8, max_windows=a.ppl_windows or None)
        protocol.update(r.protocol)
        return r.ppl

    def tcfg(steps: int, lr: float = a.lr) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=a.batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                           log_every=10, eval_every=a.eval_every, eval_batches=8, resume=False)

    def fresh():  # the teacher is frozen by the first KD run; every row starts from trainable dense weights
        return copy.deepcopy(dense).requires_grad_(True)

    def params(m) -> int:
        return sum(p.numel() for p in m.parameters())

    def one_shot(spec: str):
        est, alloc, structs = spec.split(":")
        cfg = PruneConfig(target={"ratio": a.ratio}, structures=structs.split("+"), allocation=alloc)
        m, _, rep = run_prune(fresh(), tok, cfg, ImportanceConfig(estimator=est))
        return m, rep

    rows, t_all = [], time.time()
    dense_ppl = ppl(dense)
    rows.append({"row": "dense teacher", "params": params(dense), "pruned_ppl": None, "ppl": dense_ppl})
    for spec in a.rows.split(","):
        t0 = time.time()
        if spec == "control":
            res = train(fresh(), train_ds, val_ds, tcfg(a.steps), out / "control")
            rows.append({"row": "control: dense + same tokens, CE", "params": params(dense), "pruned_ppl": None,
                         "ppl": ppl(res.model), "s": time.time() - t0})
            continue
        if spec.startswith("learned:"):  # learned:STRUCTURES[:ESTIMATOR] (an estimator: masks start from its scores)
            parts = spec.split(":")
            structs, est = parts[1].split("+"), parts[2] if len(parts) > 2 else None
            cfg = PruneConfig(target={"ratio": a.ratio}, structures=structs, allocation="uniform",
                              learn=LearnConfig(steps=a.learn_steps, warmup=a.learn_warmup, mask_lr=a.mask_lr,
                                                lambda_lr=a.lambda_lr, init="scores" if est else "uniform"))
            m, rep = learn_masks(fresh(), cfg, tcfg(a.learn_steps), train_ds, val_ds, out / spec.replace(":", "-"),
                                 teacher=dense, distill=kd, report_dir=out / (spec.replace(":", "-") + "-report"),
                                 importance=ImportanceConfig(estimator=est) if est else None, tokenizer=tok)
            after_masks = ppl(m)
            res = train(m, train_ds, val_ds, tcfg(a.steps - a.learn_steps), out / (spec.replace(":", "-") + "-kd"),
                        teacher=dense, distill=kd)
            shape = rep["target_units"]
        else:
            m, rep = one_shot(spec)
            after_masks = ppl(m)
            res = train(m, train_ds, val_ds, tcfg(a.steps), out / spec.replace(":", "-"), teacher=dense, distill=kd)
            w = rep["widths_after"]
            shape = {"heads": sorted(set(w["kv_heads"])), "mlp": sorted(set(w["intermediate"]))[:1] + ["..."]
                     if len(set(w["intermediate"])) > 1 else sorted(set(w["intermediate"])), "hidden": w["hidden"]}
        rows.append({"row": spec, "params": params(res.model), "pruned_ppl": after_masks, "ppl": ppl(res.model),
                     "shape": shape, "s": time.time() - t0})
        print(rows[-1], flush=True)

    dom_rows, history = [], None
    if a.domain_row:
        pruned, _ = one_shot(a.domain_row)
        ref = {n: domain_loss(dense, ds) for n, ds in dom_val.items()}
        sizes = [len(d) for d in dom_train.values()]
        dom_rows.append({"row": "dense teacher", **{n: math.exp(v) for n, v in ref.items()}, "all": dense_ppl})
        for name, weights, eta in (("natural proportions (static)", sizes, 0.0), ("uniform (static)", None, 0.0),
                                   (f"dynamic from uniform (eta {a.eta})", None, a.eta)):
            mix = DomainMix(dom_train, dom_val, ref, eta=eta, weights=weights)
            t0 = time.time()
            res = train(copy.deepcopy(pruned), train_ds, val_ds, tcfg(a.steps), out / ("domains-" + name.split()[0]),
                        teacher=dense, distill=kd, domains=mix)
            dom_rows.append({"row": name, **{n: math.exp(domain_loss(res.model, ds)) for n, ds in dom_val.items()},
                             "all": ppl(res.model), "final_weights": res.metrics["domain_weights"][-1]["weights"],
                             "s": time.time() - t0})
            print(dom_rows[-1], flush=True)
            if eta > 0:
                history = res.metrics["domain_weights"]
                plot_weights(history, out / "domain_weights.png")

    if dom_rows:
        plot_domains(dom_rows, list(dom_val), out / "domain_ppl.png")
    keys = ("seq_len", "stride", "windows", "tokens_scored")
    control = next((r["ppl"] for r in rows if r["row"].startswith("control")), None)
    lines = [f"machine: {benchlib.machine_line()}; wall {time.time() - t_all:.0f} s",
             "held-out PPL: shakespeare held-out works, " + ", ".join(f"{k}={protocol[k]}" for k in keys if k in protocol),
             f"tokens per row: {a.steps * a.batch_size * a.seq_len:,} ({a.steps} steps x {a.batch_size} x {a.seq_len}); "
             f"learned rows: {a.learn_steps} of them mask learning; KD forward KL, lr {a.lr}", ""]
    cells = [{**r, "shape": json.dumps(r.get("shape", "-")).replace('"', ""), "x": r["ppl"] / dense_ppl,
              "xc": control and r["ppl"] / control, "s": r.get("s", 0)} for r in rows]
    lines.append(benchlib.table(cells, [("row", "row"), ("params", "params"), ("shape", "shape (kept units)"),
                                        ("pruned_ppl", "PPL before recovery", ".2f"), ("ppl", "PPL after", ".2f"),
                                        ("x", "x dense", ".3f"), ("xc", "x control", ".3f"), ("s", "s", ".0f")],
                                align="lrlrrrrr", missing="-"))
    if dom_rows:
        names = list(dom_val)
        lines += ["", f"domains (pruned by {a.domain_row}, then {a.steps} KD steps): held-out PPL per genre", ""]
        cells = [{**r, "mean": sum(r[n] for n in names) / len(names),
                  "w": ", ".join(f"{k} {v:.2f}" for k, v in r["final_weights"].items()) if r.get("final_weights") else "-"}
                 for r in dom_rows]
        cols = [("row", "sampler")] + [(n, n, ".2f") for n in names] + [("mean", "mean over genres", ".2f"),
                                                                       ("all", "held-out works", ".2f"), ("w", "final weights")]
        lines.append(benchlib.table(cells, cols, align="l" + "r" * (len(names) + 2) + "l"))
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps({"rows": rows, "domains": dom_rows, "history": history}, indent=1,
                                              default=str))
    return 0


def plot_domains(rows: list[dict], names: list[str], path: Path) -> Path:
    """Grouped bars: per-genre held-out PPL of every sampler (and the dense teacher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(names))], [r[n] for n in names], width, label=r["row"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("held-out PPL")
    ax.set_title("per-genre PPL after the same KD budget, by domain sampler")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
