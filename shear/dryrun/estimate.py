"""``dry_run(recipe, DryRunConfig(...))``: what a recipe run would hold per rank, built on the meta device.

Nothing is trained, loaded or written: the models are built from their config on the meta device
(shear.dryrun.model), the launch is read from the environment or the recipe's launch line
(shear.dryrun.launch) and the bytes follow shear.dryrun.memory. The result is a dict (the ``--json``
payload); shear.dryrun.report prints it. A figure that cannot be computed is None ("unknown").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shear.dryrun import memory as mem
from shear.dryrun.launch import Launch, rank_device, resolve
from shear.dryrun.model import (lora_params, meta_model, offload_params, param_count, pruned_meta, recipe_config,
                                shape_of, weight_bytes)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class DryRunConfig:
    """Options of ``shear run RECIPE --dry-run``."""

    gpus: int | None = None  # plan for this many GPUs (one process each) instead of the ones seen
    gpu_mem: int | None = None  # bytes per GPU (--gpu-mem 80GB); None = the memory of the GPUs seen
    config_json: str | None = None  # the model's config.json when the recipe names a hub id not present locally
    accelerate_config: str | None = None  # plan for this accelerate config instead of the recipe's launch line
    recipe_path: str | None = None


def _item(name: str, n: int | None, formula: str = "") -> dict:
    return {"name": name, "bytes": None if n is None else int(n), "formula": formula}


def _gpus(opts: DryRunConfig, launch: Launch) -> dict:
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    count = opts.gpus if opts.gpus is not None else seen
    if opts.gpu_mem is not None:
        memory, src = opts.gpu_mem, "--gpu-mem"
    elif seen:
        local = int(os.environ.get("LOCAL_RANK", "0")) if launch.launched else 0
        memory, src = torch.cuda.get_device_properties(local).total_memory, torch.cuda.get_device_name(local)
    else:
        memory, src = None, "no GPU seen (give --gpus N --gpu-mem SIZE)"
    return {"count": count, "seen": seen, "memory_bytes": memory, "memory_source": src,
            "usable_fraction": mem.USABLE_FRACTION}


def _ranks(opts: DryRunConfig, launch: Launch, gpus: dict) -> list[dict]:
    cuda = gpus["count"] > 0
    if launch.launched:  # this process is one rank: it reports itself
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return [{"rank": int(os.environ.get("RANK", local)), "device": rank_device(local, cuda)}]
    n = opts.gpus or launch.processes or max(1, gpus["count"])
    return [{"rank": r, "device": rank_device(r, cuda)} for r in range(n)]


def _phase(name: str, device: str, items: list[dict], transient: list[dict], gpus: dict, note: str = "") -> dict:
    """A stage's per-rank memory: persistent items plus the largest transient one."""
    known = [i for i in items if i["bytes"] is not None]
    peak_t = max((i["bytes"] for i in transient if i["bytes"] is not None), default=0)
    unknown = [i["name"] for i in items + transient if i["bytes"] is None]
    peak = sum(i["bytes"] for i in known) + peak_t
    fits = None
    if device.startswith("cuda") and gpus["memory_bytes"] and not unknown:
        fits = peak <= gpus["memory_bytes"] * mem.USABLE_FRACTION
    return {"name": name, "device": device, "items": items, "transient": transient, "peak_bytes": None if unknown else peak,
            "unknown": unknown, "fits": fits, "note": note}


def _prune_device(recipe, section_device: str | None, cuda: bool) -> tuple[str, str | None]:
    if section_device == "auto" and not cuda:
        section_device = None
    if section_device:
        bare = section_device in ("cuda", "auto")
        return ("cuda:<LOCAL_RANK>" if bare else section_device), None
    if recipe.model.device_map:
        return f"spread (model.device_map={recipe.model.device_map})", None
    return "cpu", ("the calibration runs on the CPU of every rank (importance.device / sparsify.device unset; "
                   "'auto' puts it on each rank's GPU)") if cuda else None


def _calibration(recipe, base, shape, dtype_b, gpus, ranks) -> tuple[dict | None, list[str]]:
    """The prune (or sparsify) stage: calibration FLOPs and the scoring device's memory."""
    if recipe.prune is not None:
        from shear.data.calibration import resolve_calibration
        from shear.importance import ESTIMATORS
        from shear.prune.config import ImportanceConfig

        if recipe.prune.learn is not None and recipe.prune.learn.init != "scores":
            return None, []  # learned masks start uniform: no calibration
        ic = recipe.importance or ImportanceConfig()
        c = resolve_calibration(base, ic.source, recipe.data, ic.n_samples, ic.seq_len)
        n, seq, batch, device, est = c.n_samples, c.seq_len, ic.batch_size, ic.device, ic.estimator
        needs, name = ESTIMATORS[est].needs, f"prune ({est})"
        steps = recipe.prune.iterative_steps if recipe.prune.target.shape is None else 1
    elif recipe.sparsify is not None and recipe.sparsify.method != "magnitude":
        from shear.sparse.pipeline import calibration_length

        sc = recipe.sparsify
        n, seq, batch, device, est = sc.n_samples, calibration_length(base, sc), 8, sc.device, sc.method
        needs, name, steps = "activations", f"sparsify ({est})", 1
    else:
        return None, []
    dev, w = _prune_device(recipe, device, gpus["count"] > 0)
    if dev.endswith("<LOCAL_RANK>"):
        dev = ranks[0]["device"] if ranks[0]["device"].startswith("cuda") else "cuda (no GPU seen or planned)"
    items = [_item("weights", weight_bytes(base), "params x dtype bytes (the whole model on the scoring device)")]
    transient, flops, f = [], 0, "none: the estimator reads the weights only"
    if needs == "activations":
        flops, f = mem.calibration_flops(n * seq * steps, param_count(base))
        stat_b = 4 if est == "sparsegpt" else 8  # each hook's copy of its input: fp32 (Hessian) or fp64 (norms)
        transient.append(_item("calibration activations", *mem.calibration_bytes(shape, n, seq, batch, dtype_b, stat_b)))
    elif needs in ("gradients", "lora"):
        flops, f = 3 * mem.calibration_flops(n * seq * steps, param_count(base))[0], "6 x tokens x params (forward + backward)"
    if est in ("sparsegpt", "wanda"):
        items.append(_item(f"{est} statistics (one block)", *_block_stats_bytes(base, recipe.sparsify)))
    elif needs != "none" and needs != "weights" and est not in ("flap", "flap_original", "wanda_sp", "minitron"):
        transient.append(_item(f"{est} working memory", None, "not estimated (Hessians / gradients of the estimator)"))
    note = f"{n} x {seq} tokens" + (f", {steps} scoring steps" if steps > 1 else "") + "; every rank repeats it"
    ph = _phase(name, dev, items, transient, gpus, note=note if flops else "no calibration")
    ph["flops"], ph["flops_formula"] = flops, f
    return ph, [w] if w and flops else []


def _block_stats_bytes(model, cfg) -> tuple[int, str]:
    """What shear.sparse.sequential keeps per block: one [in, in] fp32 Hessian (sparsegpt) or one [in] fp64
    norm (wanda) per selected linear, for the largest block."""
    from shear.sparse.sequential import select_linears

    per_block = select_linears(model, cfg.targets)
    mods = dict(model.named_modules())
    d_in = lambda n: mods[n].weight.shape[0 if type(mods[n]).__name__ == "Conv1D" else 1]  # noqa: E731
    if cfg.method == "sparsegpt":
        n = max(sum(d_in(x) ** 2 * 4 for x in names) for names in per_block.values())
        return n, "sum over a block's linears of in^2 x 4 B (fp32 Hessians)"
    n = max(sum(d_in(x) * 8 for x in names) for names in per_block.values())
    return n, "sum over a block's linears of in x 8 B (fp64 input norms)"


def teacher_placement(recipe, launch: Launch) -> tuple[str, str]:
    """``(placement, why)`` of the KD teacher as the trainer resolves distill.teacher_placement for ``launch``."""
    from shear.train.teacher import resolve_placement

    asked = recipe.distill.teacher_placement
    sharded = launch.engine == "deepspeed" and (launch.zero_stage or 0) >= 3
    why = (f"teacher_placement auto: {'ZeRO-3 shards the student' if sharded else 'the student is not sharded'}"
           if asked == "auto" else f"teacher_placement {asked}")
    return resolve_placement(asked, sharded), why


def _teacher_items(teacher, teacher_b: int, placement: str) -> tuple[list[dict], list[dict]]:
    """(per-rank GPU items, training-step items) of the KD teacher under ``placement``."""
    if placement == "device":
        return [_item("KD teacher (full replica)", param_count(teacher) * teacher_b, "teacher params x its dtype "
                      "(teacher_placement device): outside the prepared module, not sharded")], []
    head, largest = offload_params(teacher)
    resident = _item("KD teacher output head", head * teacher_b, f"{head:,} output-embedding params x {teacher_b} B, "
                     "resident (cpu_offload: every other weight in host RAM)")
    moved = _item("teacher module (offloaded)", largest * teacher_b, f"the largest module's own params ({largest:,}) x "
                  f"{teacher_b} B, on the GPU for its forward only")
    return [resident], [moved]


def _train_phase(name, recipe, student, teacher, launch, gpus, device, trainable, adapters_per_layer, lora: bool,
                 teacher_b: int | None, masks: bool = False) -> dict:
    """Per-rank memory of a training stage on ``student`` (meta) with ``trainable`` parameters; ``teacher_b``:
    bytes per teacher parameter."""
    t, d = recipe.train, recipe.distill
    ranks = launch.processes or 1
    ds = launch.engine == "deepspeed"
    sh = mem.shards(launch.engine, launch.zero_stage)
    bf16_ds = ds and t.precision == "bf16"  # DeepSpeed casts the whole module to bf16
    model_b = BYTES[recipe.model.dtype]
    base_b = 2 if bf16_ds else model_b
    # peft keeps adapters in fp32 (autocast_adapter_dtype); learned masks are fp32 parameters of their own
    train_b = 2 if bf16_ds else (4 if (lora or masks) and model_b < 4 else model_b)
    frozen = max(0, param_count(student) - (0 if lora or masks else trainable))
    w = frozen * base_b + trainable * train_b
    items = [_item("student weights", mem.divided(w, sh["params"], ranks),
                   f"{frozen:,} frozen x {base_b} B + {trainable:,} trainable x {train_b} B"
                   + (f", / {ranks} ranks" if sh["params"] else ""))]
    g = trainable * train_b
    items.append(_item("gradients", mem.divided(g, sh["grads"], ranks),
                       f"trainable x {train_b} B" + (f", / {ranks} ranks" if sh["grads"] else "")))
    if launch.engine == "ddp" and ranks > 1 and trainable:
        items.append(_item("DDP reducer buckets", g, "= gradient bytes (gradient_as_bucket_view off)"))
    o, of = mem.optimizer_bytes(trainable, train_b, ds)
    items.append(_item("optimizer state (AdamW)", mem.divided(o, sh["optim"], ranks),
                       of + (f", / {ranks} ranks" if sh["optim"] else "")))
    if sh["params"] and ds:
        live = min(10**9, param_count(student)) * base_b
        items.append(_item("ZeRO-3 gathered parameters", live, "<= stage3_max_live_parameters (1e9, DeepSpeed's default) x bytes"))
    if t.precision == "bf16" and not ds and model_b == 4:
        items.append(_item("bf16 autocast weight cache", param_count(student) * 2, "params x 2 B (fp32 weights under bf16 autocast)"))
    t_items, t_step = (_teacher_items(teacher, teacher_b, teacher_placement(recipe, launch)[0])
                       if teacher is not None else ([], []))
    items += t_items
    act_b = 2 if t.precision == "bf16" or base_b == 2 else 4
    s_shape = shape_of(student.config)
    extra = (recipe.train.lora.r * adapters_per_layer) if lora else adapters_per_layer
    b, s = t.batch_size, recipe.data.seq_len
    act, act_f = mem.activation_bytes(s_shape, b, s, act_b, t.gradient_checkpointing, extra)
    other, _ = mem.activation_bytes(s_shape, b, s, act_b, not t.gradient_checkpointing, extra)
    act_f += f" ({'without' if t.gradient_checkpointing else 'with'} gradient checkpointing: {mem.human(other)})"
    step = [_item("activations", act, act_f)]
    if d is not None and teacher is not None:
        step += t_step
        step.append(_item("teacher forward (hidden states)",
                          *mem.teacher_forward_bytes(shape_of(teacher.config), b, s, act_b, d.hidden_weight > 0)))
        step.append(_item("KD/CE logits", *mem.kd_logit_bytes(b, s, s_shape.vocab, d.chunk_size)))
    step_total = sum(i["bytes"] for i in step if i["bytes"] is not None)
    val = _item("validation CE (no grad)", *mem.validation_bytes(b, s, s_shape.vocab))
    transient = [_item("training step: " + " + ".join(i["name"] for i in step), step_total,
                       "; ".join(f"{i['name']}: {i['formula']}" for i in step)), val]
    note = ("shear's trainer refuses FSDP (shear/train/accel.py refuse_fsdp): this launch would stop"
            if launch.engine == "fsdp" else "")
    ph = _phase(name, device, items, transient, gpus, note)
    ph["step_items"] = step
    ph["trainable_params"] = trainable
    return ph


def _teacher(recipe, config, dtype, trust) -> tuple[object, int | None, int, list[str]]:
    """(meta teacher or None, bytes per parameter it runs in, its bytes in host RAM while loading, warnings)."""
    d = recipe.distill
    if d is None:
        return None, None, 0, []
    if d.teacher is None:  # a copy of the unpruned model, cast to bf16 when asked (else its own dtype)
        teacher = meta_model(config, dtype, trust)
        t_b = 2 if d.teacher_dtype == "bf16" else BYTES[recipe.model.dtype]
        return teacher, t_b, weight_bytes(teacher), []
    try:  # a named teacher is loaded in teacher_dtype
        named = recipe.model.model_copy(update={"path": d.teacher, "init": "pretrained"})
        tcfg, _ = recipe_config(recipe.model_copy(update={"model": named}))
    except FileNotFoundError as e:
        return None, None, 0, [f"distill.teacher: {e}; its figures are unknown"]
    teacher = meta_model(tcfg, dtype, trust)
    t_b = 2 if d.teacher_dtype == "bf16" else 4
    return teacher, t_b, param_count(teacher) * t_b, []


def _pruned(recipe, config, dtype, trust, out: dict):
    """The student after the prune stage (meta), recorded in ``out['pruned']``; the unpruned model when the
    size cannot be known (vocabulary trim) or there is no prune section."""
    base = meta_model(config, dtype, trust)
    if recipe.prune is None:
        return base, None
    if recipe.prune.vocab is not None:
        out["warnings"].append("prune.vocab: the kept vocabulary depends on the text; the pruned size is unknown")
        out["pruned"] = {"params": None, "weights_bytes": None, "exact": False, "how": "unknown (vocabulary trim)"}
        return None, None
    student, info = pruned_meta(base, recipe.prune)
    sc = student.config
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    out["pruned"] = {"params": param_count(student), "weights_bytes": weight_bytes(student), **info,
                     "shape": {k: getattr(sc, k, None) for k in keys}}
    return student, info


def dry_run(recipe, opts: DryRunConfig | None = None) -> dict:
    """The per-rank plan of ``recipe`` (see the module docstring); never trains, loads weights or writes."""
    from shear.models import DTYPES

    opts = opts or DryRunConfig()
    launch = resolve(opts.recipe_path, opts.accelerate_config)
    gpus = _gpus(opts, launch)
    ranks = _ranks(opts, launch, gpus)
    launch.processes = (launch.processes or 1) if launch.launched else len(ranks)
    config, config_src = recipe_config(recipe, opts.config_json)
    dtype, trust = DTYPES[recipe.model.dtype], recipe.model.trust_remote_code
    base, shape = meta_model(config, dtype, trust), shape_of(config)
    out = {"model": {"config": config_src, "model_type": getattr(config, "model_type", None), "dtype": recipe.model.dtype,
                     "params": param_count(base), "weights_bytes": weight_bytes(base),
                     "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab},
           "launch": {"engine": launch.engine, "zero_stage": launch.zero_stage, "processes": launch.processes,
                      "source": launch.source, "line": launch.line},
           "gpus": gpus, "ranks": ranks, "phases": [], "warnings": [], "pruned": None}
    train_dev = ranks[0]["device"] if gpus["count"] > 0 else "cpu"
    teacher, t_b, t_host, warn = _teacher(recipe, config, dtype, trust)
    out["warnings"] += warn
    out["host_ram_per_rank_bytes"] = weight_bytes(base) + t_host
    if teacher is not None:
        placement, why = teacher_placement(recipe, launch)
        out["teacher"] = {"placement": placement, "why": why,
                          "host_ram_training_bytes": param_count(teacher) * t_b if placement == "cpu_offload" else 0}
    cal, warn = _calibration(recipe, base, shape, BYTES[recipe.model.dtype], gpus, ranks)
    out["warnings"] += warn
    out["phases"] += [cal] if cal is not None else []
    student, info = _pruned(recipe, config, dtype, trust, out)
    if recipe.prune is not None and recipe.prune.learn is not None:  # the mask stage trains the unpruned model
        frozen = recipe.prune.learn.weight_lr == 0
        trainable = info["mask_units"] + (0 if frozen else param_count(base))
        ph = _train_phase("learn masks", recipe, base, teacher, launch, gpus, train_dev, trainable,
                          adapters_per_layer=shape.q + shape.mlp + shape.hidden, lora=False,
                          teacher_b=t_b, masks=frozen)
        ph["note"] = (("weights frozen (weight_lr 0): trainable = mask log-alphas" if frozen else "weights and masks "
                       "train") + "; activations count the masked products (q + i + h per layer) on top"
                      + (f"; {ph['note']}" if ph["note"] else ""))
        out["phases"].append(ph)
    if recipe.train is not None and student is not None:
        lora = recipe.train.lora is not None
        trainable, per_layer = lora_params(student, recipe.train.lora) if lora else (param_count(student), 0)
        out["phases"].append(_train_phase("train", recipe, student, teacher, launch, gpus, train_dev, trainable,
                                          per_layer, lora, t_b))
        if recipe.prune is not None and recipe.prune.tune_rounds > 1:
            out["warnings"].append("prune.tune_rounds: rounds train ever smaller models; the first rounds hold more "
                                   "than the final model these train figures use")
    gpu_phases = [p for p in out["phases"] if p["device"].startswith("cuda")]
    out["fits"] = (None if not gpu_phases or any(p["fits"] is None for p in gpu_phases)
                   else all(p["fits"] for p in gpu_phases))
    return out
