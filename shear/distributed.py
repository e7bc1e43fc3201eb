"""Calibration under a multi-process launch: split the batches over the ranks, sum what they found.

    rank, world = world_size()
    for i in my_batches(n_batches): ...        # batches i % world == rank
    all_reduce_sum_(tensors)                    # every rank ends with the sums over all batches

Statistics that are sums over calibration batches (gradients and their squares for Taylor scores,
activation sums for FLAP / Wanda-sp / Minitron / block influence, LoRAPrune's per-batch scores) are
computed once in total, a 1/W share per rank, and reduced, so every rank holds the single-process
result (up to the order of the float additions) and plans the same prune. Without a process group
(one process), or with fewer batches than ranks, nothing is split and nothing is reduced.

Work that rank 0 does alone (evaluation, export) ends at :func:`wait_for_main`: a barrier on a gloo
group with a long timeout (:data:`WAIT_TIMEOUT`), so the other ranks wait for an hours-long evaluation
instead of failing at the next collective's default 10-30 min timeout. The group is made by
:func:`make_side_group` right after the process group starts, while every rank is there; it also
carries CPU tensors when the default backend is NCCL.
"""
from __future__ import annotations

from datetime import timedelta

import torch

#: how long ranks wait at :func:`wait_for_main` for rank 0 (an lm-eval run of an 8B model takes hours)
WAIT_TIMEOUT = timedelta(hours=24)
_side = {"group": None}


def world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when there is none."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def make_side_group() -> None:
    """Create the gloo side group (every rank must call this, at the same point; once per process group)."""
    rank, world = world_size()
    if world > 1:
        _side["group"] = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def forget_side_group() -> None:
    """Drop the side group once its process group is destroyed (a later group makes its own)."""
    _side["group"] = None


def _side_group():
    if _side["group"] is None:
        raise RuntimeError("shear.distributed: no side group; call make_side_group() on every rank after the "
                           "process group starts (shear.train.accel.init_processes does)")
    return _side["group"]


def _group_for(t: torch.Tensor):
    """The default group, unless ``t`` sits on the CPU and the default backend cannot carry it (NCCL)."""
    if t.device.type == "cpu" and "gloo" not in torch.distributed.get_backend():
        return _side_group()
    return None


def my_batches(n_batches: int) -> range:
    """Indices of the calibration batches this rank runs: ``rank, rank + W, ...``; all of them in one
    process or when there are fewer batches than ranks (each rank then computes everything itself)."""
    rank, world = world_size()
    if world == 1 or n_batches < world:
        return range(n_batches)
    return range(rank, n_batches, world)


def is_split(n_batches: int) -> bool:
    """Whether :func:`my_batches` splits ``n_batches`` over the ranks (then the sums must be reduced)."""
    return len(my_batches(n_batches)) != n_batches


def all_reduce_sum_(tensors: list[torch.Tensor], bucket: int = 1 << 24) -> None:
    """Sum each tensor over the ranks, in place. Every rank passes the same shapes in the same order.

    Tensors of one device and dtype are flattened into buckets of up to ``bucket`` elements (one
    collective per bucket, not per tensor); larger tensors go alone."""
    if world_size()[1] == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for ts in by_kind.values():
        chunk, size = [], 0
        for t in ts + [None]:
            if chunk and (t is None or size + t.numel() > bucket):
                flat = torch.cat([c.reshape(-1) for c in chunk])
                torch.distributed.all_reduce(flat, group=_group_for(flat))
                for c, part in zip(chunk, flat.split([c.numel() for c in chunk])):
                    c.copy_(part.view_as(c))
                chunk, size = [], 0
            if t is not None:
                chunk.append(t)
                size += t.numel()


def all_reduce_floats(values: list[float]) -> list[float]:
    """``values`` summed over the ranks (fp64: counts stay exact up to 2**53)."""
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum_([t])
    return t.tolist()


def wait_for_main() -> None:
    """Barrier on the side group (long timeout): rank 0 arrives when its own work (evaluation, export) is done."""
    if world_size()[1] > 1:
        torch.distributed.barrier(group=_side_group())


def broadcast_from_main_(model: torch.nn.Module) -> None:
    """Make every rank's ``model`` rank 0's: the same parameter and buffer shapes are checked (a rank
    that pruned to another shape is an error naming the first difference), then the values are broadcast."""
    rank, world = world_size()
    if world == 1:
        return
    state = list(model.state_dict(keep_vars=True).items())
    shapes = [(k, tuple(v.shape)) for k, v in state]
    every = [None] * world
    torch.distributed.all_gather_object(every, shapes, group=_side_group())
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            diff = next((a, b) for a, b in zip(every[0], theirs) if a != b) if len(theirs) == len(every[0]) \
                else (f"{len(every[0])} tensors", f"{len(theirs)}")
            raise ValueError(f"rank {r} holds a model different from rank 0's ({diff[1]} vs {diff[0]}): the ranks "
                             "did not prune the same way (calibration ids or scores differ between ranks)")
    with torch.no_grad():
        for _, v in state:
            t = v.data if v.is_contiguous() else v.data.contiguous()
            torch.distributed.broadcast(t, src=0, group=_group_for(t))
            if t is not v.data:
                v.data.copy_(t)
