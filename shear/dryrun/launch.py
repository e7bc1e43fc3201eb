"""Where a run would train: ranks, engine (DDP, DeepSpeed ZeRO-n, FSDP) and devices, decided before anything is built.

Read in this order: the environment of ``accelerate launch`` / ``torchrun`` (WORLD_SIZE, LOCAL_RANK,
ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_USE_FSDP, FSDP_SHARDING_STRATEGY);
else an accelerate config file (``--accelerate-config``); else the launch line on the recipe's first line
(``# accelerate launch --config_file X [--num_processes N] -m shear ...``); else one process.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

FSDP_STAGE = {"FULL_SHARD": 3, "HYBRID_SHARD": 3, "SHARD_GRAD_OP": 2, "_HYBRID_SHARD_ZERO2": 2, "NO_SHARD": 0,
              "1": 3, "2": 2, "3": 0, "4": 3, "5": 2}  # accelerate also writes the strategies as numbers


@dataclass
class Launch:
    """How the training stage runs. ``engine``: single, ddp, deepspeed, fsdp; ``zero_stage``: the ZeRO stage
    (FSDP: the stage its sharding strategy equals); ``source``: where this was read."""

    engine: str = "single"
    zero_stage: int | None = None
    processes: int | None = None
    source: str = "one process (no launch found)"
    launched: bool = False
    line: str | None = None


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "t", "yes", "y", "on")


def from_env(env=os.environ) -> Launch | None:
    """The launch this process runs under, or None when it was not started by a launcher."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        return Launch("deepspeed", int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0), world,
                      "this launch (ACCELERATE_USE_DEEPSPEED)", True)
    if _truthy(env.get("ACCELERATE_USE_FSDP")):
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        return Launch("fsdp", FSDP_STAGE.get(strategy, 3), world, f"this launch (FSDP {strategy})", True)
    if world > 1 or "LOCAL_RANK" in env:
        return Launch("ddp" if world > 1 else "single", None, world, "this launch (WORLD_SIZE)", True)
    return None


def from_config(path: str | Path, processes: int | None = None, line: str | None = None) -> Launch:
    """An accelerate config file (``recipes/accelerate/*.yaml``); ``processes`` overrides its num_processes."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"accelerate config not found: {p}")
    c = yaml.safe_load(p.read_text()) or {}
    kind = str(c.get("distributed_type", "NO")).upper()
    n = processes or int(c.get("num_processes", 1) or 1)
    if kind == "DEEPSPEED":
        stage = int((c.get("deepspeed_config") or {}).get("zero_stage", 0) or 0)
        return Launch("deepspeed", stage, n, f"{p} (DeepSpeed ZeRO-{stage})", line=line)
    if kind == "FSDP":
        strategy = str((c.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        return Launch("fsdp", FSDP_STAGE.get(strategy, 3), n, f"{p} (FSDP {strategy})", line=line)
    return Launch("ddp" if n > 1 or kind.startswith("MULTI") else "single", None, n, f"{p} ({kind})", line=line)


def recipe_launch_line(recipe_path: str | Path) -> str | None:
    """The ``accelerate launch ...`` command on the recipe's first line (a comment), if it has one."""
    first = (Path(recipe_path).read_text().splitlines() or [""])[0]
    m = re.match(r"^#\s*(accelerate launch .*)$", first.strip())
    return m.group(1) if m else None


def from_line(line: str, recipe_path: str | Path) -> Launch:
    """Parse ``accelerate launch --config_file X [--num_processes N] ...``; X is found relative to the cwd,
    else to the directory that holds ``recipes/``."""
    argv = shlex.split(line)
    opts = {}
    for j, a in enumerate(argv):
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            opts[k] = v
        elif a.startswith("--") and j + 1 < len(argv) and not argv[j + 1].startswith("-"):
            opts[a[2:]] = argv[j + 1]
    n = int(opts["num_processes"]) if "num_processes" in opts else None
    cfg = opts.get("config_file")
    if cfg is None:
        return Launch("ddp" if (n or 1) > 1 else "single", None, n, "the recipe's launch line", line=line)
    where = [Path(cfg)] + [parent / cfg for parent in Path(recipe_path).resolve().parents]
    found = next((w for w in where if w.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"the recipe's launch line names {cfg}, which is not found (pass --accelerate-config)")
    launch = from_config(found, n, line)
    launch.source = f"the recipe's launch line: {launch.source}"
    return launch


def resolve(recipe_path: str | Path | None, accelerate_config: str | None = None, env=os.environ) -> Launch:
    launched = from_env(env)
    if launched is not None:
        return launched
    if accelerate_config:
        return from_config(accelerate_config)
    line = recipe_launch_line(recipe_path) if recipe_path else None
    if line:
        return from_line(line, recipe_path)
    return Launch()


def rank_device(local_rank: int, cuda: bool) -> str:
    """The device a rank trains on: cuda:<LOCAL_RANK> with CUDA (accelerate's choice), else cpu."""
    return f"cuda:{local_rank}" if cuda else "cpu"
