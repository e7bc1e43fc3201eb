"""accelerate glue: build the Accelerator for this machine and launch mode, prepare, gather.

CPU facts this follows (docs/PLATFORM-NOTES): multi-process CPU needs Accelerator(cpu=True) and a
gloo process group; DeepSpeed needs its micro-batch size given explicitly when no dataloader is
prepared; ZeRO-3 weights must be gathered to export.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch


def is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def _reset_accelerate_singletons() -> None:
    """Allow several train() calls in one process with different precision / accumulation."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def refuse_fsdp(env=os.environ) -> None:
    """FSDP is not supported: raise instead of training without sharded checkpoints.

    The trainer saves and resumes through ``shear.train.checkpoint`` (full trainable state, or
    DeepSpeed's own engine checkpoints) and exports by unwrapping the module; neither handles
    FSDP's sharded state dicts, and no wrap policy is derived from the model. Sharded training
    is DeepSpeed ZeRO-3 (``recipes/accelerate/zero3.yaml``), which is tested end to end.
    """
    if env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "t", "yes", "y", "on"):  # accelerate's str_to_bool
        raise ValueError("accelerate config: distributed_type FSDP is not supported by shear's trainer (no sharded "
                         "checkpoint save/resume, no wrap policy); use recipes/accelerate/zero3.yaml (DeepSpeed "
                         "ZeRO-3) for sharded training or recipes/accelerate/ddp.yaml")


def _process_settings() -> tuple[bool, dict]:
    """``(cpu, process group kwargs)`` for this launch: what :func:`build_accelerator` and
    :func:`init_processes` both give accelerate, so the process group is the same whoever starts it."""
    no_cuda = not torch.cuda.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    uses_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = no_cuda and not uses_ds  # cpu=True makes accelerate ignore DeepSpeed; DS picks its CPU backend itself
    return cpu, ({"backend": "gloo"} if no_cuda and multi else {})


#: set while a process group started by :func:`init_processes` (not by an Accelerator) is alive
_STARTED = {"group": False}


def init_processes() -> bool:
    """Start the process group of a multi-process launch now, before any model work, as the trainer's
    Accelerator would start it (it then reuses it), plus :mod:`shear.distributed`'s side group.
    Returns whether it started one (False: one process, or a group exists); the caller ends it with
    :func:`end_processes`. Until then :func:`end_training` leaves it alive between stages."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    from accelerate.state import PartialState

    from shear import distributed

    refuse_fsdp()
    PartialState._reset_state()  # a state left by an earlier group in this process would not start a new one
    cpu, kwargs = _process_settings()
    PartialState(cpu=cpu, **kwargs)
    distributed.make_side_group()
    _STARTED["group"] = True
    return True


def end_processes() -> None:
    """End the process group :func:`init_processes` started: every rank meets at a barrier first, so none tears
    its connections down while a peer still reads from them (gloo then aborted a loaded peer at exit:
    'terminate called without an active exception')."""
    if _STARTED["group"] and torch.distributed.is_initialized():
        from shear import distributed

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        distributed.forget_side_group()
    _STARTED["group"] = False


def end_training(accelerator) -> None:
    """``accelerator.end_training()`` (trackers finished, process group destroyed), except that a process
    group :func:`init_processes` started is left alive for the stages after training."""
    if not _STARTED["group"]:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()


def build_accelerator(cfg, out_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    refuse_fsdp()
    _reset_accelerate_singletons()
    cpu, pg = _process_settings()
    handlers = [InitProcessGroupKwargs(**pg)] if pg else []
    uses_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    kwargs = {}
    if uses_ds:
        # accelerate fills "auto" batch sizes from a prepared dataloader; we have none, so say them.
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0
        ds.pop("train_batch_size", None)
        plugin.gradient_accumulation_steps = cfg.grad_accum
        kwargs["deepspeed_plugin"] = plugin
    return Accelerator(
        cpu=cpu, mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers,
        log_with=trackers, project_dir=str(out_dir), **kwargs)


def prepare(accelerator, module, optimizer, cfg):
    """accelerate.prepare for the loss module and optimizer (the lr schedule stays ours)."""
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    return accelerator.prepare(module, optimizer)


def gather_deepspeed_model(accelerator, engine):
    """Full (unsharded) student from a DeepSpeed engine, loaded into the unwrapped module."""
    inner = accelerator.unwrap_model(engine)
    state = accelerator.get_state_dict(engine)  # ZeRO-3: needs zero3_save_16bit_model / gathers
    model = inner.model
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()  # ZeRO-3: removes the gather/release hooks so the returned model runs standalone
    if state is not None:
        prefix = "model."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if accelerator.is_main_process or sub:
            _load_full(model, sub)
    model.eval()
    return model


def _load_full(model, state: dict) -> None:
    """Load gathered weights into a model whose own ZeRO-3 params are empty placeholders."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if n in state:
                p.data = state[n].to(dtype=p.dtype if p.numel() else state[n].dtype).clone()
