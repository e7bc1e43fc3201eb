"""Prune while tuning: K rounds of (rescore, prune a fraction, tune ``train.steps // K`` steps).

Round ``k`` (1-based) prunes the current model to ``P0 - (P0 - P_target) * k / K`` parameters (the
schedule of ``run_prune``'s ``iterative_steps``), then tunes it; the last round takes the remainder
of ``train.steps``, so the total number of optimizer steps (and tokens) equals a one-shot run.
Each round trains in ``OUT/round-k/train`` (its own checkpoints: a killed run resumes per round;
earlier rounds are replayed from their final checkpoints). Each round uses data seed
``train.seed + k - 1`` so rounds do not repeat each other's batches, and its own lr schedule
(warmup capped at the round's steps).

LoRAPrune mode (``importance.estimator = "loraprune"``, Zhang et al. 2023, needs ``train.lora``):
the model is wrapped with adapters here and the trainer only sees the peft model. During each
round's tuning an optimizer pre-step hook reads the adapter factors and their gradients
(``shear.train.loraprune.lora_importance``: |W' * (G_B A + B G_A - G_B G_A)|, no full-weight
gradient is ever formed), sums them over each member's rows/columns, divides each member's vector
by its L2 norm, adds the members of a group, and keeps a moving average per group (0.9 avg + 0.1
cur from 0, non-finite steps skipped), as the reference code does. Round ``k`` is planned from
the scores gathered while tuning round ``k - 1``; round 1 (nothing tuned yet) is scored by a
calibration pass through a freshly wrapped copy (B = 0, so the estimate is s G A^T A), summed over
the calibration batches. Grads are read after clipping. Depth groups, when ``layers`` may shrink,
are scored by ``importance.layer_estimator``. No bias compensation.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from shear.analyze.graph import DEPTH_KINDS, Group, StructureGraph
from shear.importance import criteria as C

log = logging.getLogger("shear")

from shear.importance.estimators import LORAPRUNE  # registered there (no import from importance up to train)
EMA_BETA = 0.9


def round_targets(p0: int, final: int, rounds: int) -> list[int]:
    """Parameter budget after each round: ``int(p0 - (p0 - final) * k / rounds)``, k = 1..rounds."""
    return [int(p0 - (p0 - final) * k / rounds) for k in range(1, rounds + 1)]


def round_steps(steps: int, rounds: int) -> list[int]:
    """``steps // rounds`` per round, the remainder to the last one (the total is ``steps``)."""
    base = steps // rounds
    if base == 0:
        raise ValueError(f"prune.tune_rounds: {rounds} rounds need train.steps >= {rounds}, got {steps}")
    return [base] * (rounds - 1) + [steps - base * (rounds - 1)]


# ---- LoRAPrune: element scores -> group scores --------------------------------------------------

def group_scores_from_elements(elem: dict[str, torch.Tensor], groups: list[Group], aggregation: str = "sum"):
    """``{module path: element scores}`` -> ``{group: [num_units]}``, normalised as LoRAPrune's reference.

    Each member whose parameter is a scored weight contributes the sum of the elements on its
    units' rows or columns (``m.dim``), divided by that vector's L2 norm (+1e-8): every module
    (every slice of a fused one) weighs the same, whatever its size or gradient scale. Members
    without adapters (norms, embeddings) are left out. A group none of whose members has an
    adapter is an error.
    """
    out = {}
    for g in groups:
        per = []
        for m in g.members:
            key = m.param[: -len(".weight")] if m.param.endswith(".weight") else None
            if key in elem:
                v = C.per_unit(elem[key], m.dim, m.units)
                per.append(v / (torch.linalg.vector_norm(v) + 1e-8))
        if not per:
            raise ValueError(f"importance.estimator=loraprune: group {g.name!r} has no member with a LoRA adapter; "
                             f"add its projections to train.lora.target_modules")
        out[g.name] = C.aggregate(per, aggregation)
    return out


def lora_calibration_scores(peft_model, groups: list[Group], ids: torch.Tensor, batch_size: int,
                            aggregation: str = "sum", adapter: str = "default") -> dict[str, torch.Tensor]:
    """Sum over calibration batches of LoRAPrune group scores: forward + backward of the mean CE
    (only adapter params require grad), ``lora_importance``, aggregate. ``ids``: LongTensor [n, L].
    Under a process group each rank scores every W-th batch and the sums are all-reduced
    (:mod:`shear.distributed`)."""
    from shear import distributed
    from shear.train.loraprune import lora_importance

    params = [p for p in peft_model.parameters() if p.requires_grad]
    was_training = peft_model.training
    peft_model.eval()
    dev = next(peft_model.parameters()).device
    total = None
    batches = ids.split(batch_size)
    for i in distributed.my_batches(len(batches)):
        x = batches[i].to(dev)
        for p in params:
            p.grad = None
        peft_model(input_ids=x, labels=x, use_cache=False).loss.backward()
        cur = group_scores_from_elements(lora_importance(peft_model, adapter), groups, aggregation)
        total = cur if total is None else {k: total[k] + v for k, v in cur.items()}
    for p in params:
        p.grad = None
    peft_model.train(was_training)
    if distributed.is_split(len(batches)):
        distributed.all_reduce_sum_([total[k] for k in sorted(total)])
    return total


class LoraScoreHook:
    """Context manager: before every optimizer step, LoRAPrune group scores of ``peft_model`` from
    the current adapter gradients, averaged with ``update_ema`` (``.scores``; ``.steps`` counts the
    steps seen, ``.skipped`` those whose scores were not finite)."""

    def __init__(self, peft_model, groups: list[Group], aggregation: str = "sum", beta: float = EMA_BETA):
        self.model, self.groups, self.aggregation, self.beta = peft_model, groups, aggregation, beta
        self.scores, self.steps, self.skipped = None, 0, 0

    def _hook(self, optimizer, args, kwargs):
        from shear.train.loraprune import lora_importance, update_ema

        cur = group_scores_from_elements(lora_importance(self.model), self.groups, self.aggregation)
        new = update_ema(self.scores, cur, self.beta)
        self.skipped += new is self.scores
        self.scores = new
        self.steps += 1

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _save_scores(scores: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in scores.items()}, str(path))


def _load_scores(path: Path) -> dict:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


# ---- the schedule ---------------------------------------------------------------------------

def _final_params(graph: StructureGraph, model, cfg) -> int:
    from shear.prune.plan import ParamCounter, model_shapes

    if cfg.target.shape is not None:
        raise ValueError("prune.tune_rounds: prune-while-tuning needs a ratio or params target, not a shape")
    if cfg.target.ratio is not None:
        return int(ParamCounter(graph, model_shapes(model)).count({}) * (1 - cfg.target.ratio))
    return cfg.target.params


def _lora_prune_step(model, cfg, icfg, kinds, scores, ids, tp):
    """Plan from LoRAPrune ``scores`` (+ layer_estimator for depth kinds) and slice ``model`` in place."""
    from shear.analyze import analyze
    from shear.importance import score
    from shear.prune.plan import build_plan, model_shapes
    from shear.prune.slice import prune_

    graph = analyze(model, heads=cfg.heads)
    sc = {g.name: scores[g.name] for g in graph.groups if g.kind in kinds and g.kind not in DEPTH_KINDS}
    depth = set(kinds) & set(DEPTH_KINDS)
    if depth:
        sc.update(score(model, graph, icfg, ids, kinds=depth)[0])
    plan = build_plan(graph, sc, cfg, model_shapes(model), target_params=tp)
    prune_(model, plan, graph)
    return plan


def _width_groups(model, cfg, kinds) -> list[Group]:
    from shear.analyze import analyze

    return [g for g in analyze(model, heads=cfg.heads).groups if g.kind in kinds and g.kind not in DEPTH_KINDS]


def prune_while_tuning(model, tokenizer, prune_cfg, importance_cfg, train_cfg, train_ds, val_ds, out_dir, *,
                       rounds: int, teacher=None, distill=None, data=None) -> tuple[torch.nn.Module, dict]:
    """K = ``rounds`` rounds of prune (to the round's parameter budget) then tune; see the module docstring.

    Returns ``(model, report)``: the pruned, tuned plain HF model (LoRA merged) and
    ``{"params_before", "params_after", "total_steps", "rounds": [{round, target_params,
    params_after, steps, val_ppl, final_train_loss}, ...]}`` (also ``OUT/iterative_report.json``).
    """
    from shear.analyze import analyze
    from shear.importance import needs_data
    from shear.prune.config import ImportanceConfig
    from shear.prune.pipeline import kinds_needed, run_prune
    from shear.train.lora import apply_lora
    from shear.train.trainer import train

    if rounds < 1:
        raise ValueError(f"prune.tune_rounds: must be >= 1, got {rounds}")
    icfg = importance_cfg or ImportanceConfig()
    lorap = icfg.estimator == LORAPRUNE
    if lorap and train_cfg.lora is None:
        raise ValueError("importance.estimator='loraprune' needs train.lora (scores come from the LoRA factors)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = kinds_needed(prune_cfg)
    graph = analyze(model, heads=prune_cfg.heads)
    p0, final = graph.total_params, _final_params(graph, model, prune_cfg)
    targets, steps = round_targets(p0, final, rounds), round_steps(train_cfg.steps, rounds)
    ids = None
    if lorap or needs_data(icfg, kinds):
        from shear.data.calibration import calibration_for

        ids, _ = calibration_for(model, tokenizer, icfg.source, data, icfg.n_samples, icfg.seq_len, icfg.seed)
    report = {"estimator": icfg.estimator, "rounds_total": rounds, "params_before": p0, "target_params": final,
              "rounds": []}
    scores = None
    for k, (tp, n_steps) in enumerate(zip(targets, steps), start=1):
        rdir = out / f"round-{k}"
        rcfg = train_cfg.model_copy(update={"steps": n_steps, "seed": train_cfg.seed + k - 1,
                                            "warmup_steps": min(train_cfg.warmup_steps, n_steps)})
        if not lorap:
            pcfg = prune_cfg.model_copy(update={"target": prune_cfg.target.model_copy(
                update={"ratio": None, "params": tp}), "iterative_steps": 1})
            model, _, prep = run_prune(model, tokenizer, pcfg, icfg, rdir / "prune", ids=ids)
            res = train(model, train_ds, val_ds, rcfg, rdir / "train", teacher=teacher, distill=distill,
                        tokenizer=tokenizer)
        else:
            if scores is None:  # round 1: nothing tuned yet -> calibration pass on fresh adapters
                groups = _width_groups(model, prune_cfg, kinds)
                peft = apply_lora(model, train_cfg.lora)
                scores = lora_calibration_scores(peft, groups, ids, icfg.batch_size, icfg.aggregation)
                model = peft.unload()  # B = 0: nothing to merge
            _lora_prune_step(model, prune_cfg, icfg, kinds, scores, ids, tp)
            prep = {"params_after": analyze(model, heads=prune_cfg.heads).total_params}
            groups = _width_groups(model, prune_cfg, kinds)
            peft = apply_lora(model, train_cfg.lora)
            with LoraScoreHook(peft, groups, icfg.aggregation) as hook:
                res = train(peft, train_ds, val_ds, rcfg.model_copy(update={"lora": None, "full_finetune": True}),
                            rdir / "train", teacher=teacher, distill=distill, tokenizer=tokenizer)
            saved = rdir / "loraprune_scores.safetensors"
            if hook.scores is not None and hook.steps == n_steps:
                _save_scores(hook.scores, saved)
                scores = hook.scores
            elif saved.exists():  # this round was replayed from its final checkpoint
                scores = _load_scores(saved)
            else:
                scores = hook.scores
                log.warning("round %d: LoRAPrune scores from %d of %d steps (resumed mid-round)", k, hook.steps, n_steps)
        model = res.model
        rec = {"round": k, "target_params": tp, "params_after": prep["params_after"], "steps": res.metrics["steps"],
               "val_ppl": res.metrics["final_val_ppl"], "final_train_loss": res.metrics["final_train_loss"]}
        report["rounds"].append(rec)
        log.info("round %d/%d: %s", k, rounds, rec)
    report["params_after"] = report["rounds"][-1]["params_after"]
    report["total_steps"] = sum(r["steps"] for r in report["rounds"])
    report["final_val_ppl"] = report["rounds"][-1]["val_ppl"]
    (out / "iterative_report.json").write_text(json.dumps(report, indent=1, default=str))
    return model, report


def run_rounds_from_recipe(recipe, model, tokenizer, teacher, out: Path) -> tuple[torch.nn.Module, dict]:
    """``shear run`` glue: prune-while-tuning from a recipe's prune/importance/train/distill/data sections.

    ``teacher``: the KD teacher the caller already holds (``run_recipe`` resolves it once, before
    pruning); ``distill.teacher`` is loaded here only when it is None.
    """
    from shear.data.text import build_datasets

    if recipe.train is None:
        raise ValueError("prune.tune_rounds > 1 needs a train section (rounds alternate pruning and tuning)")
    if recipe.data.domains:
        raise ValueError("data.domains: dynamic batch loading is not supported with prune.tune_rounds > 1; "
                         "prune first, then train with data.domains")
    if recipe.distill is not None and recipe.distill.teacher is not None and teacher is None:
        from shear.models import load_teacher  # only when the caller has not loaded it (run_recipe has)

        teacher = load_teacher(recipe.distill.teacher, recipe.distill.teacher_dtype, recipe.model.trust_remote_code,
                               model)
    if recipe.distill is not None and teacher is None:
        raise ValueError("recipe.distill: no teacher; set distill.teacher or keep the unpruned model as teacher")
    train_ds, val_ds = build_datasets(recipe.data, tokenizer)
    return prune_while_tuning(model, tokenizer, recipe.prune, recipe.importance, recipe.train, train_ds, val_ds,
                              out / "rounds", rounds=recipe.prune.tune_rounds, teacher=teacher, distill=recipe.distill,
                              data=recipe.data)

