"""``shear prune DIR --stream``: structured pruning one decoder block at a time, disk to disk.

    shear prune ~/models/llama-3-8b --stream --estimator flap --ratio 0.3 -o runs/flap30
    shear prune ~/models/llama-3-8b --stream --ratio 0.3 -o runs/obs30     # obs, the default estimator

The model is a skeleton on the meta device (:func:`shear.checkpoint.skeleton`); at most one block is in memory
(in the compute dtype: fp32 on CPU) beside the calibration activations (OBS: and that block's Hessians,
``[in, in]`` fp32 per consumer), whatever the depth. Two passes:

1. **Scoring.** The tensors outside the blocks are read for one pass up to the blocks (block 0's inputs and
   each block's keyword arguments) and freed. Then block by block: read from the shards, run on its inputs with
   the statistics hooks of the in-memory pass (:func:`~shear.importance.calibrate.calibrate_block`: the dense
   model's activations), its groups scored by the estimator while its weights are there, freed (OBS:
   :func:`~shear.importance.obs_hooks.score_block`, its Hessians and greedy scores, the dense block's outputs
   feeding the next block, as ``obs_scores`` does). Scores are standardized across layers, and the plan (with
   where compensation biases go) is built on the skeleton, as in memory (``build_plan``, ``plan_with_biases``).
2. **Slicing.** The tensors outside the blocks are copied as stored (cast to the written dtype); then block by
   block: read, FLAP's compensation biases computed from its weights and the stored input means, the block
   sliced by :func:`~shear.prune.slice.prune_` with the plan's groups of that block, the biases added, written
   into new shards in the written dtype. OBS first captures block 0's inputs again, and refits each block
   before slicing it as ``reconstruct_`` does (:func:`~shear.importance.obs_hooks.refit_block`: its consumers
   in order, on the outputs of the blocks already refitted, its new biases added while its outputs are
   computed for the next block); the biases written are the refit's (``prune_to_target_``'s rule: FLAP's
   placement, the refit's values, none where the refit fits none). ``config.json`` comes from a skeleton
   pruned by the whole plan on meta (stock class for uniform widths, else the per-layer layout), as ``export``
   writes it.

Scores, plan and exported tensors equal ``shear prune`` without ``--stream`` (tests/test_prune_stream.py). What
needs the whole model is refused in one line before any work: hidden channels and layers (they change every
block and the embeddings), estimators with gradients (Taylor), iterative steps, vocabulary trims; checkpoints
must be safetensors whose names are the model's.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from shear.analyze import analyze
from shear.analyze.families import family_of
from shear.analyze.graph import DEPTH_KINDS, HEAD_KINDS, PrunePlan
from shear.checkpoint import Checkpoint, materialize_, release_, skeleton
from shear.importance import ESTIMATORS, ScoringContext, needs_data, score_modules, standardize_scores
from shear.importance.calibrate import ActivationStats, blocks_path, calibrate_block, decoder_layers
from shear.importance.compensation import BiasPlan, apply_biases_, compensation_biases, flag_zero_biases
from shear.importance.obs_hooks import (aggregate, consumers_of, new_bias_modules, refit_block, refit_consumers,
                                        score_block)
from shear.memory import trim
from shear.models import DTYPES, check_weights_finite, resolve_device
from shear.progress import progress
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.plan import build_plan, model_shapes
from shear.prune.slice import prune_
from shear.prune.transform import (PruneResult, check_settings, compensates, final_params, kinds_needed,
                                   plan_with_biases, warn_skipped, warn_zero_biases)
from shear.storage import MAX_SHARD_SIZE
from shear.streaming import BlockStream, group_by_block, tensor_specs, write_config


#: estimators that score a block from its own weights and input statistics
STREAMABLE = ("obs", "flap", "flap_original", "wanda_sp", "minitron", "magnitude_l1", "magnitude_l2", "random")
#: estimators that refit the kept weights block by block after planning (:mod:`shear.importance.obs_hooks`)
REFIT = ("obs",)
_WIDTH = set(HEAD_KINDS) | {"mlp_channel"}


def check_streamable(cfg: PruneConfig, icfg: ImportanceConfig) -> None:
    """Refuse, in one line, what the streamed path does not do."""
    if icfg.estimator not in STREAMABLE:
        raise ValueError(f"prune --stream: estimator {icfg.estimator!r} needs the whole model (gradients); "
                         f"streamed estimators: {', '.join(STREAMABLE)}")
    other = sorted(kinds_needed(cfg) - _WIDTH)
    if other:
        raise ValueError(f"prune --stream cuts heads and MLP channels inside each block; {'/'.join(other)} change "
                         "every block and the embeddings together: prune them without --stream")
    if cfg.iterative_steps != 1:
        raise ValueError("prune --stream: one step only (iterative steps rescore the pruned model)")
    if cfg.vocab is not None:
        raise ValueError("prune --stream: a vocabulary trim needs the whole model; drop --stream")
    if icfg.bias_compensation and ESTIMATORS[icfg.estimator].needs != "activations":
        raise ValueError(f"importance.bias_compensation: estimator {icfg.estimator!r} records no input means to "
                         "compensate with")


class _Blocks:
    """The blocks of the skeleton and where their tensors are read (``specs``: the unpruned model's)."""

    def __init__(self, model, ckpt: Checkpoint, compute: torch.dtype, batch_size: int, device):
        self.list, self.path = decoder_layers(model), blocks_path(model)
        self.specs = tensor_specs(model, ckpt, compute, what="prune --stream")
        self.outside, self.names = group_by_block(self.specs, self.path, len(self.list))
        self.run = BlockStream(model, ckpt, self.specs, None, batch_size, device)

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}."

    def load(self, i: int):
        block, prefix = self.list[i], self.prefix(i)
        materialize_(block, self.run.read(self.names[i], prefix), self.run.device)
        return block


def _score(model, graph, icfg, ids, groups, blocks: _Blocks, fam) -> tuple[dict, ActivationStats | None]:
    """Pass 1: ``({group: scores}, activation statistics)``, one block in memory at a time."""
    est = ESTIMATORS[icfg.estimator]
    ctx = ScoringContext(model, graph, icfg, ids)
    ctx.modules = score_modules(groups)
    data, refit = est.needs == "activations", icfg.estimator in REFIT
    if refit:
        ctx._need_ids()
    hidden, kws = blocks.run.capture(blocks.outside, ids) if data else (None, None)
    if data and not refit:
        ctx.act = ActivationStats(tokens=sum(h.shape[0] * h.shape[1] for h in hidden))
    cons, per = (consumers_of(groups), {g.name: [] for g in groups}) if refit else ({}, {})
    last = len(blocks.list) - 1
    names = {m: n for n, m in model.named_modules()}
    by_layer: dict[int, list] = {}
    for g in groups:
        by_layer.setdefault(g.layer, []).append(g)
    scores = {}
    for i in progress(range(len(blocks.list)), "scoring blocks"):
        if not data and (est.needs == "none" or i not in by_layer):
            continue
        block = blocks.load(i)
        check_weights_finite(block, str(blocks.run.ckpt.path), blocks.prefix(i))
        if refit:  # OBS: Hessians and greedy scores of the dense block (obs_scores' block step)
            got, hidden = score_block(model, block, hidden, kws[i], cons.get(i, {}),
                                      icfg.bias_compensation is not False, pass_on=i < last)
            for n, sc in got.items():
                per[n] += sc
        elif data:
            calibrate_block(model, i, block, hidden, kws, ctx.act, names, ctx.modules, fam)
        if data:
            kws[i] = None
        if est.needs != "none" and i in by_layer and not refit:
            scores.update(est.fn(ctx, by_layer[i]))
        release_(block)
        trim()
    if est.needs == "none":  # seeded over all groups at once, as in memory
        scores = est.fn(ctx, groups)
    if refit:
        scores = aggregate(per, icfg.aggregation)
    return standardize_scores(scores, [g for g in groups if g.kind not in DEPTH_KINDS], icfg), ctx.act


def _slice(model, final, graph, plan: PrunePlan, bp: BiasPlan, stats, blocks: _Blocks, export_dir: Path,
           written: torch.dtype, max_shard_size, fam, res: PruneResult, ids=None, refit: bool = False) -> None:
    """Pass 2: every block read, compensated (``refit``: OBS-refitted on ``ids``), sliced and written; the
    tensors outside copied (module docstring). With ``refit`` ``bp.add`` holds the refit's new biases only."""
    from shear.shards import ShardWriter

    new = {f"{n}.bias" for n in bp.add}
    specs = tensor_specs(final, blocks.run.ckpt, written, new=new, what="prune --stream")
    outside, per_block = group_by_block(specs, blocks.path, len(blocks.list))
    order = outside + [n for names in per_block for n in names]
    writer = ShardWriter(export_dir, {n: tuple(specs[n][1:]) for n in order}, max_shard_size)
    out = BlockStream(model, blocks.run.ckpt, specs, writer, blocks.run.batch_size, blocks.run.device)
    out.copy(outside)
    cons = refit_consumers(graph, plan) if refit else {}
    biased = {n for n, b in bp.add.items() if b is not None}
    if cons:  # block 0's inputs again, for the layer-sequential refit (reconstruct_)
        hidden, kws = blocks.run.capture(blocks.outside, ids)
    for i in progress(range(len(blocks.list)), "slicing blocks"):
        prefix = blocks.prefix(i)
        block = blocks.load(i)
        sub = PrunePlan(remove={k: v for k, v in plan.remove.items() if graph[k].layer == i})
        if refit:  # the outputs of the refitted block (its new biases added) feed the next block's refit
            tr = time.time()
            values = {}
            if cons:
                values, hidden = refit_block(model, block, hidden, kws[i], cons.get(i, {}), plan, biased,
                                             pass_on=i < len(blocks.list) - 1)
                kws[i] = None
            res.time_s["reconstruction"] += time.time() - tr
        else:
            values = compensation_biases(model, sub, graph, stats) if res.compensate and sub.remove else {}
        prune_(model, sub, graph)  # the skeleton's config it rewrites is not used: the export's is final's
        mine = {n: b for n, b in bp.add.items() if n.startswith(prefix)}
        apply_biases_(model, BiasPlan(add={n: (values[n] if b is not None else None) for n, b in mine.items()}))
        for k, v in (flag_zero_biases(model, fam, blocks.path, bp.flags) if bp.flags else {}).items():
            res.zero_biases[k] = res.zero_biases.get(k, 0) + v
        out.write_block(block, prefix, per_block[i])
    writer.close()


@torch.no_grad()
def prune_streamed(path: str | Path, tokenizer, cfg: PruneConfig, icfg: ImportanceConfig | None = None,
                   out_dir: str | Path | None = None, export_dir: str | Path | None = None, recipe: dict | None = None,
                   written: str = "fp32", compute: str = "fp32", max_shard_size: int | str = MAX_SHARD_SIZE,
                   trust_remote_code: bool = False, ids: torch.Tensor | None = None) -> dict:
    """Prune the checkpoint at ``path`` block by block (module docstring); return the report ``run_prune`` gives.

    ``out_dir``: report, plans and width plot (``shear.prune.pipeline.write_outputs``); ``export_dir``: a new
    directory the pruned model is written into (sealed: tokenizer, recipe, manifest), weights in ``written``.
    ``compute``: the dtype blocks are scored and sliced in; ``ids``: calibration tokens (else from
    ``icfg.source``, as ``shear prune`` picks them)."""
    from shear.prune.export import finish_config, layout_of, seal, stock_overrides
    from shear.prune.pipeline import PeakMemory, layer_widths, prune_report, write_outputs

    icfg = icfg or ImportanceConfig()
    check_settings(cfg, icfg)
    check_streamable(cfg, icfg)
    t0, calib, t_calib = time.time(), None, 0.0
    device = torch.device(resolve_device(icfg.device) or "cpu")
    with PeakMemory() as mem:
        model = skeleton(path, DTYPES[compute], trust_remote_code)
        if device.type != "cpu":
            for name, b in list(model.named_buffers()):
                materialize_(model, {name: b}, device, complete=False)
        graph = analyze(model, heads=cfg.heads)
        before_w, p0, macs0 = layer_widths(graph), graph.total_params, graph.total_macs
        kinds = kinds_needed(cfg)
        groups = [g for g in graph.groups if g.kind in kinds]
        if ids is None and needs_data(icfg, kinds):
            from shear.data.calibration import calibration_for
            from shear.models import check_vocab

            check_vocab(model, tokenizer, str(path))
            tc = time.time()
            ids, calib = calibration_for(model, tokenizer, icfg.source, None, icfg.n_samples, icfg.seq_len, icfg.seed)
            t_calib = time.time() - tc
        fam = family_of(model)
        res = PruneResult(compensate=compensates(model, icfg, fam))
        blocks = _Blocks(model, Checkpoint(path), DTYPES[compute], icfg.batch_size, device)
        ts = time.time()
        scores, stats = _score(model, graph, icfg, ids, groups, blocks, fam)
        res.time_s["scoring"] = time.time() - ts
        ts = time.time()
        tp = final_params(model, graph, cfg)
        if res.compensate:
            plan, bp = plan_with_biases(model, graph, scores, cfg, ScoringContext(model, graph, icfg), tp, fam,
                                        placement_only=True)
        else:
            plan, bp = build_plan(graph, scores, cfg, model_shapes(model), target_params=tp), BiasPlan()
        refit = icfg.estimator in REFIT
        if refit:  # where the refit puts new biases (the transform keeps only those of bp.add's non-None ones)
            cons = refit_consumers(graph, plan)
            fitted = new_bias_modules(model, cons, {n for n, b in bp.add.items() if b is not None}) if cons else set()
            bp.add = {n: b for n, b in bp.add.items() if b is None or n in fitted}
        res.plans, res.flags, res.skipped = [plan], list(bp.flags), list(bp.skipped)
        res.compensated = [n for n, b in bp.add.items() if b is not None]
        warn_skipped(bp, fam)
        final = skeleton(path, DTYPES[compute], trust_remote_code)  # the pruned model's shapes and config
        prune_(final, plan, graph)
        apply_biases_(final, bp)
        res.time_s["planning"] = time.time() - ts
        ts = time.time()
        if export_dir is not None:
            export_dir = Path(export_dir)
            export_dir.mkdir(parents=True)
            _slice(model, final, graph, plan, bp, stats, blocks, export_dir, DTYPES[written], max_shard_size, fam, res,
                   ids, refit)
            with stock_overrides(final):
                write_config(final, Path(path).expanduser(), export_dir, DTYPES[written])
            finish_config(final, export_dir, layout_of(final))
            seal(export_dir, tokenizer, recipe)
        res.time_s["slicing"] = time.time() - ts - res.time_s["reconstruction"]
        after = analyze(final, heads=cfg.heads)
    warn_zero_biases(res, fam)
    report = prune_report(cfg, icfg, res, before_w, p0, macs0, after, final, ids, calib, t_calib, t0, mem)
    report["stream"] = True
    write_outputs(out_dir, res.plans, before_w, report)
    if export_dir is not None:
        report["model_dir"] = str(export_dir)
    return report
