"""The learned-mask prune stage (``prune.learn``): attach masks, train them in the trainer, finish.

    model, report = learn_masks(model, prune_cfg, train_cfg, train_ds, val_ds, "runs/x/learn", teacher=t,
                                distill=d, report_dir="runs/x/prune")

The trainer runs ``prune.learn.steps`` steps with the recipe's train settings (batch, precision,
checkpoints, resume, KD, dynamic batch loading) on the weights and the masks together (or the masks
alone with ``weight_lr: 0``); then every mask is fixed to its exact top-k, folded and sliced, so the
model is uniform and exports as the stock class. The report says the target, the shape reached, the
parameter and MAC counts, and plots the expected sizes against the ramped target.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from shear.analyze import analyze
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import layer_widths, plot_widths
from shear.prune.plan import model_shapes
from shear.shearing.finish import finish_
from shear.shearing.masks import MASK_TYPES, attach_masks, init_from_scores_
from shear.shearing.target import full_shape, resolve_target
from shear.shearing.term import ShearingTerm
from shear.train.config import TrainConfig
from shear.train.trainer import train

log = logging.getLogger("shear")


def target_of(cfg: PruneConfig, graph, shapes) -> dict[str, int]:
    """``prune.target`` (ratio, params, shape or shape_from) -> units kept per mask type."""
    t = cfg.target
    if t.shape is not None:
        return resolve_target(graph, shapes, shape=t.shape.model_dump(exclude_none=True))
    ratio = t.ratio if t.ratio is not None else 1.0 - t.params / graph.total_params
    return resolve_target(graph, shapes, ratio=ratio, types=tuple(cfg.structures), round_to=cfg.round_to)


def init_scores(model: nn.Module, graph, types: tuple[str, ...], importance: ImportanceConfig | None, tokenizer,
                data=None, ids: torch.Tensor | None = None) -> tuple[dict, str | None]:
    """``prune.learn.init: scores``: the importance estimator's scores of the groups the masks of ``types``
    will cover (calibrated as for one-shot pruning). Returns (scores, the line naming the calibration text)."""
    from shear.importance import needs_data, score

    icfg = importance or ImportanceConfig()
    kinds = {g.kind for g in graph.groups if any(g.kind in MASK_TYPES[t] for t in types)}
    calib = None
    if ids is None and needs_data(icfg, kinds):
        from shear.data.calibration import calibration_for

        ids, calib = calibration_for(model, tokenizer, icfg.source, data, icfg.n_samples, icfg.seq_len, icfg.seed)
    scores, _ = score(model, graph, icfg, ids, kinds=kinds)
    return scores, calib


def learn_masks(model: nn.Module, cfg: PruneConfig, train_cfg: TrainConfig, train_ds, val_ds, out_dir, *,
                teacher: nn.Module | None = None, distill=None, tokenizer=None, domains=None,
                report_dir: str | Path | None = None, importance: ImportanceConfig | None = None, data=None,
                ids: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Learn masks toward ``cfg.target`` (``cfg.learn`` settings), finish them; return (pruned model, report).

    With ``cfg.learn.init == "scores"`` the masks start ordered by ``importance`` scores (calibration
    ``ids``, else text from ``importance.source`` / ``data`` as for one-shot pruning)."""
    learn, t0 = cfg.learn, time.time()
    graph = analyze(model, heads=cfg.heads)
    before_w, p0, macs0 = layer_widths(graph), graph.total_params, graph.total_macs
    target = target_of(cfg, graph, model_shapes(model))
    if not target:
        raise ValueError("prune.target: the target is the full model; nothing to learn")
    log.info("learned masks: target %s (units kept per row) of %s", target, full_shape(graph))
    scores, calib = init_scores(model, graph, tuple(target), importance, tokenizer, data, ids) \
        if learn.init == "scores" else (None, None)
    masks = attach_masks(model, graph, tuple(target), hidden_norm=learn.hidden_norm,
                         log_alpha_range=learn.log_alpha_range)
    if scores is not None:
        init_from_scores_(masks, scores)
    term = ShearingTerm(masks, target, learn.ramp(), mask_lr=learn.mask_lr, lambda_lr=learn.lambda_lr,
                        constraint=learn.constraint, eval_keep=learn.eval_keep)
    log.info("learned masks: constraint %s, eval masks keep the %s count, log alpha clamped to %s, hidden norms "
             "over %s channels", learn.constraint, learn.eval_keep, learn.log_alpha_range, learn.hidden_norm)
    frozen = learn.weight_lr == 0
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(not frozen)
    tcfg = train_cfg.model_copy(update={
        "steps": learn.steps, "lr": learn.weight_lr or train_cfg.lr, "lora": None, "full_finetune": True,
        "warmup_steps": min(train_cfg.warmup_steps, learn.steps)})
    try:
        res = train(model, train_ds, val_ds, tcfg, out_dir, teacher=teacher, distill=distill, tokenizer=tokenizer,
                    domains=domains, shearing=term)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    model = res.model
    sizes = {t: s for t, (s, _) in term.report.items()}
    plan = finish_(model, masks, target)
    after = analyze(model, heads=cfg.heads)
    report = {
        "method": "learned masks (hard concrete, Lagrangian)", "target": cfg.target.model_dump(exclude_none=True),
        "target_units": target, "full_units": full_shape(graph), "final_expected_fraction": sizes,
        "structures": sorted(target), "heads": cfg.heads, "learn": learn.model_dump(),
        "weights": "frozen" if frozen else f"trained (lr {tcfg.lr})",
        "params_before": p0, "params_after": after.total_params, "removed_ratio": 1 - after.total_params / p0,
        "macs_before": macs0, "macs_after": after.total_macs, "mac_ratio": after.total_macs / macs0,
        "widths_before": before_w, "widths_after": layer_widths(after),
        "removed_layers": sorted(int(k.split(".")[1]) for k, v in plan.remove.items() if k.endswith(".layer")),
        "masked_val_ppl": res.metrics.get("final_val_ppl"), "tokens": learn.steps * res.metrics["global_batch"]
        * res.metrics["seq_len"], "time_s": {"total": round(time.time() - t0, 3), "train": res.metrics["train_s"]},
        "init": learn.init, "estimator": (importance or ImportanceConfig()).estimator if learn.init == "scores" else None,
        "calibration_text": calib,
    }
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(plot_widths(before_w, report["widths_after"], out / "kept_widths.png"))
        report["mask_plot"] = str(plot_sizes(Path(out_dir) / "metrics.jsonl", out / "mask_sizes.png"))
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("learned masks: %s -> %s params (%.1f%% removed)", p0, after.total_params, 100 * report["removed_ratio"])
    return model, report


def plot_sizes(metrics_file: Path, path: Path) -> Path:
    """Expected kept fraction of each mask type and its ramped target over the steps (from the trainer's log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"lagrangian"' in line]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in sorted({k[5:] for r in rows for k in r if k.startswith("size_")}):
        line, = ax.plot([r["step"] for r in rows], [r[f"size_{t}"] for r in rows], label=f"{t} (expected)")
        ax.plot([r["step"] for r in rows], [r[f"target_{t}"] for r in rows], "--", color=line.get_color(), lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("kept fraction")
    ax.set_title("learned masks: expected size vs target (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
