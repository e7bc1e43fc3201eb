"""Where the frozen KD teacher runs (DistillConfig.teacher_placement): on the rank's device, or offloaded.

    teacher = place_teacher(teacher, "cpu_offload", torch.device("cuda:0"), torch.bfloat16)

``cpu_offload`` keeps the weights in host memory: accelerate's ``cpu_offload`` hooks move each module's
own weights to the execution device for its forward and release them after, so a rank's GPU holds one
module's weights at a time instead of a full replica (under ZeRO-3 the student holds 1/N of its own).
The output embeddings stay resident on the device: the KD loss calls them once per token chunk, outside
the teacher's forward (shear.train.losses.chunked_logit_losses). The price: each teacher forward copies every
weight host to device, and each rank keeps a whole teacher in host RAM (a teacher sharded by a second DeepSpeed
engine would not; not done).
"""
from __future__ import annotations

import torch
import torch.nn as nn

PLACEMENTS = ("auto", "device", "cpu_offload")


def resolve_placement(placement: str, sharded: bool) -> str:
    """``device`` or ``cpu_offload``: ``auto`` offloads when the student's parameters are sharded (ZeRO-3)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"distill.teacher_placement: unknown {placement!r} ({', '.join(PLACEMENTS)})")
    if placement == "auto":
        return "cpu_offload" if sharded else "device"
    return placement


def params_sharded(accelerator) -> bool:
    """Whether this Accelerator shards the student's parameters: DeepSpeed ZeRO stage 3."""
    from .accel import is_deepspeed

    if not is_deepspeed(accelerator):
        return False
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    return int((ds.get("zero_optimization") or {}).get("stage", 0) or 0) >= 3


def _unhook(teacher: nn.Module) -> None:
    """Undo an earlier :func:`place_teacher` offload (iterative rounds train with the same teacher):
    the hooks go and each weight is back in host memory."""
    if getattr(teacher, "_shear_offloaded", False):
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(teacher)  # AlignDevicesHook.detach_hook puts the weights back
        teacher._shear_offloaded = False


def place_teacher(teacher: nn.Module, placement: str, device: torch.device,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze ``teacher`` (eval, no grad), cast it to ``dtype`` (None: its own) and place it.

    placement ``device``: the whole teacher on ``device``; ``cpu_offload``: weights in host memory, each
    module's on ``device`` only during its forward, the output embeddings resident on ``device``.
    """
    _unhook(teacher)
    teacher.eval().requires_grad_(False)
    if placement == "device":
        return teacher.to(device=device, dtype=dtype)
    if placement != "cpu_offload":
        raise ValueError(f"distill.teacher_placement: {placement!r} is not a placement (device, cpu_offload)")
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    teacher.to(device="cpu", dtype=dtype)
    cpu_offload(teacher, execution_device=torch.device(device))
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None:  # called per KD chunk: one copy on the device instead of one transfer per chunk
        remove_hook_from_module(head)  # its weights back from the offload map (detach_hook)
        head.to(device)
    teacher._shear_offloaded = True
    return teacher
