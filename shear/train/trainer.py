"""The training loop: pretraining, fine-tuning and recovery (CE and/or KD), on accelerate.

    train(model, train_ds, val_ds, TrainConfig(steps=100), "runs/x", teacher=t, distill=DistillConfig())

Runs unchanged in one process, under `accelerate launch --multi_gpu --num_processes 2` (CPU: gloo),
and under DeepSpeed ZeRO via accelerate. Batches are a function of (seed, step) (see data.py); each
micro-batch loss is a token SUM divided by the global scored-token count of the step, so the
gradient does not depend on how the global batch is split over processes and micro-batches.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .accel import build_accelerator, end_training, is_deepspeed, prepare
from .checkpoint import latest_checkpoint, resume_checkpoint, save_checkpoint
from .config import DistillConfig, TrainConfig
from .data import StepSampler, collate, local_micro_batches
from .lora import apply_lora, merge_lora
from .student import LossModule, attention_mask_for, teacher_hidden_states
from .teacher import params_sharded, place_teacher, resolve_placement

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: nn.Module  # plain HF model (LoRA merged), ready for save_pretrained
    metrics: dict = field(default_factory=dict)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_optimizer(module: nn.Module, cfg: TrainConfig, extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases). ``extra_groups`` (learned masks) keep
    their own lr and weight decay; their parameters are left out of the weight groups."""
    taken = {id(p) for g in extra_groups for p in g["params"]}
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad and id(p) not in taken:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + [dict(g) for g in extra_groups]
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g.setdefault("constant_lr", False)
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """The lr schedule (lr_factor) on every group but those marked ``constant_lr``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda s: 1.0) if g["constant_lr"] else (lambda s: lr_factor(s, cfg)) for g in optimizer.param_groups])


def _use_config_hparams(optimizer, scheduler, cfg: TrainConfig, fresh: list[dict]) -> None:
    """After a resume, the config's lr, betas and weight decay apply, not those saved in the checkpoint.

    They differ only when a run continues under a changed recipe (``shear run --resume``); otherwise
    this sets the very values the checkpoint held (LambdaLR's lr = base_lr * factor(last_epoch)).
    ``fresh``: each group's settings as built (weight_decay, betas, base_lr, constant_lr).
    """
    scheduler.base_lrs = [f["base_lr"] for f in fresh]
    for g, f in zip(optimizer.param_groups, fresh):
        factor = 1.0 if f["constant_lr"] else lr_factor(scheduler.last_epoch, cfg)
        g.update(f, initial_lr=f["base_lr"], lr=f["base_lr"] * factor)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _prepare_teacher(teacher, distill, accelerator):
    """The teacher frozen, in distill.teacher_dtype, placed by distill.teacher_placement (one log line says where)."""
    if teacher is None:
        return None
    sharded = params_sharded(accelerator)
    placement = resolve_placement(distill.teacher_placement if distill is not None else "device", sharded)
    dtype = torch.bfloat16 if distill is not None and distill.teacher_dtype == "bf16" else None
    teacher = place_teacher(teacher, placement, accelerator.device, dtype)
    if accelerator.is_main_process and distill is not None:
        where = (f"the whole teacher on {accelerator.device}" if placement == "device" else
                 f"weights in host memory, each module on {accelerator.device} only for its forward, output "
                 "embeddings resident")
        why = (f"teacher_placement auto: {'ZeRO-3 shards the student' if sharded else 'the student is not sharded'}"
               if distill.teacher_placement == "auto" else "teacher_placement " + placement)
        log.info("KD teacher: %s, %s (%s)", where, next(teacher.parameters()).dtype, why)
    return teacher


@torch.no_grad()
def evaluate_ppl(accelerator, module, val_ds, cfg: TrainConfig) -> dict:
    """Validation NLL/PPL over the first eval_batches batches (all if 0), split over ranks evenly."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n_batches = math.ceil(len(val_ds) / cfg.batch_size)
    if cfg.eval_batches:
        n_batches = min(n_batches, cfg.eval_batches)
    per_rank = max(1, n_batches // world)  # equal counts: ZeRO-3 forwards are collective
    was_training = module.training
    module.eval()
    sums = torch.zeros(2, device=accelerator.device)
    for b in range(rank, per_rank * world, world):
        idx = [i % len(val_ds) for i in range(b * cfg.batch_size, (b + 1) * cfg.batch_size)]
        batch = {k: v.to(accelerator.device) for k, v in collate(val_ds, idx).items()}
        with accelerator.autocast():
            out = module(batch["input_ids"], batch["labels"], ce_only=True)
        sums += torch.stack([out["ce"].float(), out["tokens"].float()])
    sums = accelerator.reduce(sums, "sum")
    module.train(was_training)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _set_dropout(model: nn.Module, p: float | None) -> dict[tuple[str, str], float]:
    """Set the dropout of ``model`` to ``p`` (None: leave it): every ``nn.Dropout`` and the float
    ``attention_dropout`` that Llama-style attention reads; returns {(module name, attribute): its own value}."""
    slots = [(name, m, "p" if isinstance(m, nn.Dropout) else "attention_dropout") for name, m in model.named_modules()
             if isinstance(m, nn.Dropout) or isinstance(getattr(m, "attention_dropout", None), float)]
    if p is not None and not slots:
        log.warning("train.dropout: %s has no dropout shear can set; the setting has no effect", type(model).__name__)
    own = {(name, attr): getattr(m, attr) for name, m, attr in slots}
    if p is not None:
        for _, m, attr in slots:
            setattr(m, attr, p)
    return own


def train(model: nn.Module, train_ds, val_ds, cfg: TrainConfig, out_dir, *, teacher: nn.Module | None = None,
          distill: DistillConfig | None = None, tokenizer=None, masks: dict | None = None,
          domains=None, shearing=None, on_start=None) -> TrainResult:
    """Train `model` on `train_ds` (items {"input_ids": [L], "labels": [L]}); see the module docstring.

    With `distill`, `teacher` is required (frozen, eval mode, optionally bf16) and the loss is
    ce_weight*CE + kd_weight*KD + hidden_weight*H. Returns the trained model (LoRA merged) and
    metrics: final_train_loss, eval history, tokens_per_s, wall_s. `tokenizer`, when given, is saved
    to OUT/tokenizer. `masks` ({parameter name: bool, True = kept}, shear.sparse.recovery.zero_masks):
    those weights stay exactly zero (masked gradients, re-masked after every step and after the LoRA
    merge; metrics["sparse_masks"] says what the re-masking after merge cost). Side effect: the global
    torch RNG is seeded with cfg.seed. `domains` (shear.data.domains.DomainMix): dynamic batch loading;
    `train_ds` is then ignored, each batch's domain mix is drawn from weights updated at every evaluation
    (their history in metrics["domain_weights"], the sampler's state in every checkpoint). `shearing`
    (shear.shearing.ShearingTerm, hooked on `model`): learned masks, trained with the weights (or alone when
    no weight requires grad) under their own lrs; the Lagrangian is added once per step, the expected
    sizes are logged (size_<type>, target_<type>); the returned model still carries the masks' hooks.
    `on_start` (no arguments) is called on the main process once the checkpoint to resume from, if any, is
    restored and before anything is written (a run directory records a changed recipe only then).
    """
    t_start = time.time()
    out_dir = Path(out_dir)
    if distill is not None and teacher is None:
        raise ValueError("distill: a teacher model is required (distill.teacher or the unpruned model)")
    accelerator = build_accelerator(cfg, out_dir)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)  # dropout / adapter init stream: same on every rank and every run

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache while training; restored on the returned model
    keeper = None
    if masks:
        from shear.sparse.recovery import MaskKeeper

        if is_deepspeed(accelerator):
            raise ValueError("train: keeping sparse masks under DeepSpeed is not supported; train without a DeepSpeed config")
        keeper = MaskKeeper(model, masks)  # on the plain model: the parameter objects survive peft and DDP
    if shearing is not None:
        if is_deepspeed(accelerator):
            raise ValueError("prune.learn: learned masks train in one process or under DDP "
                             "(recipes/accelerate/ddp.yaml), not under DeepSpeed")
        if cfg.lora is not None:
            raise ValueError("prune.learn: learned masks are trained with all weights or with frozen weights, "
                             "not with LoRA adapters (their hooks sit on the base layers)")
    own_dropout = _set_dropout(model, cfg.dropout)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    teacher = _prepare_teacher(teacher, distill, accelerator)
    module = LossModule(model, distill, teacher, shearing=shearing)
    every_layer = bool(module.pairs)  # the teacher's hidden states of every layer only for hidden-state KD
    module.train()
    optimizer = build_optimizer(module, cfg, shearing.param_groups() if shearing is not None else ())
    scheduler = build_scheduler(optimizer, cfg)
    skip = {id(p) for p in shearing.parameters()} if shearing is not None else set()
    clip_params = [p for p in module.parameters() if p.requires_grad and id(p) not in skip]  # not masks, not λ
    module, optimizer = prepare(accelerator, module, optimizer, cfg)

    ckpt_root = out_dir / "checkpoints"
    state = {"step": 0, "eval": [], "train": []}
    last = None
    if cfg.resume:  # the newest readable checkpoint; a damaged one is skipped with a warning
        fresh = [{k: g[k] for k in ("weight_decay", "betas", "base_lr", "constant_lr")} for g in optimizer.param_groups]
        last, saved = resume_checkpoint(accelerator, module, optimizer, scheduler, ckpt_root)
    if last is not None:
        state = saved
        _use_config_hparams(optimizer, scheduler, cfg, fresh)
        if main:
            print(f"resuming from {last} (step {state['step']})")
    if main and on_start is not None:
        on_start()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=1))
        if tokenizer is not None and not (out_dir / "tokenizer").exists():
            tokenizer.save_pretrained(out_dir / "tokenizer")  # checkpoints stay usable on their own
    accelerator.init_trackers("shear", config={k: v for k, v in cfg.model_dump().items() if isinstance(v, (int, float, str, bool))})

    world, rank = accelerator.num_processes, accelerator.process_index
    global_bs = cfg.batch_size * cfg.grad_accum * world
    if domains is not None:  # the sampler's state (weights, read positions) travels in the checkpoint
        train_ds, sampler = domains.concat(), domains.sampler(cfg.seed, state.get("domains"))
    else:
        sampler = StepSampler(len(train_ds), cfg.seed)
    seq_len = int(torch.as_tensor(train_ds[0]["input_ids"]).shape[-1])
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not main, desc="train", dynamic_ncols=True)
    metrics_file = out_dir / "metrics.jsonl"
    train_time, tokens_done, last_loss = 0.0, 0, float("nan")
    if state["step"] >= cfg.steps and state["train"]:
        last_loss = state["train"][-1]["loss"]

    try:  # the bar closes before an error reaches the user, not after its message
        while state["step"] < cfg.steps:
            step = state["step"]
            t0 = time.time()
            micro = local_micro_batches(sampler.global_batch(step, global_bs), cfg.batch_size, cfg.grad_accum, rank, world)
            batches = [{k: v.to(accelerator.device) for k, v in collate(train_ds, idx).items()} for idx in micro]
            if shearing is not None:
                shearing.step = step
            sums, grad_norm = _train_step(accelerator, module, optimizer, scheduler, keeper, batches, cfg, step, ckpt_root,
                                          teacher if distill is not None else None, clip_params, every_layer)
            loss = sums[0].item()
            state["step"] = step = step + 1
            train_time += time.time() - t0
            tokens_done += global_bs * seq_len
            last_loss = loss
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens_done / max(train_time, 1e-9)}
                if distill is not None:
                    rec.update(ce=sums[1].item(), kd=sums[2].item(), hidden=sums[3].item())
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if shearing is not None:
                    rec["lagrangian"] = sums[4].item()
                    for t, (s_hat, goal) in shearing.report.items():
                        rec[f"size_{t}"], rec[f"target_{t}"] = s_hat, goal
                state["train"].append(rec)
                _log(accelerator, metrics_file, rec)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                ev = {"step": step, **evaluate_ppl(accelerator, module, val_ds, cfg)}
                if domains is not None:
                    ev.update(domains.evaluate_and_update(
                        step, lambda ds: evaluate_ppl(accelerator, module, ds, cfg)["val_loss"], sampler))
                state["eval"].append(ev)
                _log(accelerator, metrics_file, ev)
                if main:
                    bar.write(f"step {step}: val loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}")
            if domains is not None:
                state["domains"] = sampler.state_dict()
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                save_checkpoint(accelerator, module, optimizer, scheduler, state, ckpt_root, cfg.keep_checkpoints)
    finally:
        bar.close()
    student = _final_model(accelerator, module, cfg)  # before end_training: ZeRO-3 gathers are collective
    remask = keeper.finalize(student, lambda m: evaluate_ppl(accelerator, LossModule(m), val_ds, cfg)["val_ppl"]) \
        if keeper is not None else None
    if use_cache is not None:
        student.config.use_cache = use_cache
    mods = dict(student.named_modules())  # the model's own dropout back (by name: the student may be a gathered copy)
    for (name, attr), value in own_dropout.items():
        if name in mods and hasattr(mods[name], attr):
            setattr(mods[name], attr, value)
    end_training(accelerator)
    metrics = {"final_train_loss": last_loss, "eval": state["eval"],
               "final_val_ppl": state["eval"][-1]["val_ppl"] if state["eval"] else None,
               "tokens_per_s": tokens_done / train_time if train_time else None,
               "train_s": round(train_time, 2), "wall_s": round(time.time() - t_start, 2),
               "steps": state["step"], "global_batch": global_bs, "seq_len": seq_len, "processes": world}
    if remask is not None:
        metrics["sparse_masks"] = remask
    if domains is not None:
        metrics["domain_weights"] = sampler.history
        if main:
            from shear.data.domains import plot_weights

            plot_weights(sampler.history, out_dir / "domain_weights.png")
    if main:
        (out_dir / "train_summary.json").write_text(json.dumps(metrics, indent=1))
    return TrainResult(model=student, metrics=metrics)


def _train_step(accelerator, module, optimizer, scheduler, keeper, batches: list[dict], cfg: TrainConfig, step: int,
                ckpt_root: Path, teacher, clip_params=None, every_layer: bool = True) -> tuple[torch.Tensor, object]:
    """One optimizer step over this rank's micro-batches; returns (token-mean [loss, ce, kd, hidden],
    then the Lagrangian of learned masks (0 without), grad norm of ``clip_params`` (default: all)).

    Losses are sums over label tokens scaled by the global token count, so a step is the same whatever
    the micro-batching and the number of processes. The Lagrangian (learned masks) is a per-step term:
    each micro-batch adds it unscaled, backward divides by grad_accum and DDP averages over processes,
    so it counts once. The loss is checked for NaN/inf before backward.
    """
    world = accelerator.num_processes
    count = sum((b["labels"][:, 1:] != -100).sum() for b in batches).float().reshape(1)
    if world > 1:
        count = accelerator.reduce(count, "sum")
    scale = world * cfg.grad_accum / count.clamp(min=1)  # backward divides by accum, DDP averages over world
    sums = torch.zeros(4, device=accelerator.device)
    lag = torch.zeros((), device=accelerator.device)
    for b in batches:
        with accelerator.accumulate(module):
            with accelerator.autocast():
                t_hidden = teacher_hidden_states(teacher, b["input_ids"], attention_mask_for(teacher, b["labels"]),
                                                 every_layer) if teacher is not None else None
                out = module(b["input_ids"], b["labels"], t_hidden)
            _stop_if_nonfinite(accelerator, out["loss"], step, ckpt_root)  # before backward: DeepSpeed steps in it
            loss = out["loss"] * scale
            if "lagrangian" in out:
                loss = loss + out["lagrangian"]
                lag = out["lagrangian"].detach().float()
            accelerator.backward(loss)
            sums += torch.stack([out[k].detach().float() for k in ("loss", "ce", "kd", "hidden")])
    sums = (accelerator.reduce(sums, "sum") if world > 1 else sums) / count.clamp(min=1)
    sums = torch.cat([sums, lag.reshape(1)])
    grad_norm = None
    if cfg.max_grad_norm is not None and not is_deepspeed(accelerator):
        params = clip_params if clip_params is not None else module.parameters()
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if params else None
    optimizer.step()
    if keeper is not None:
        keeper.apply()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def _stop_if_nonfinite(accelerator, loss: torch.Tensor, step: int, ckpt_root: Path) -> None:
    """Raise FloatingPointError when a micro-batch loss is NaN/inf on any rank, BEFORE its backward.

    It cannot wait for the step's summed loss: under DeepSpeed ``accelerator.backward`` also runs
    ``engine.step()`` at the accumulation boundary, so a check after the last backward would come
    after the NaN update. All ranks agree (a reduced flag), so none is left waiting in a collective.
    The weights stay those after step ``step``; the newest checkpoint on disk is the last good one.
    """
    bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item() > 0:
        good = latest_checkpoint(ckpt_root)
        end_training(accelerator)
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at step {step + 1}; stopped before backward, the "
            f"weights are those after step {step}. Last good checkpoint: {good if good else 'none'}. "
            f"Lower train.lr or check the data.")


def _log(accelerator, path: Path, rec: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])


def _final_model(accelerator, module, cfg: TrainConfig) -> nn.Module:
    """The student as a plain HF model: unwrapped, ZeRO-3 weights gathered, LoRA merged."""
    if is_deepspeed(accelerator):
        from .accel import gather_deepspeed_model

        return merge_lora(gather_deepspeed_model(accelerator, module))
    inner = accelerator.unwrap_model(module).model
    inner.eval()
    if cfg.gradient_checkpointing and hasattr(inner, "gradient_checkpointing_disable"):
        inner.gradient_checkpointing_disable()
    return merge_lora(inner)
