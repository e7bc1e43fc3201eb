"""Checkpoints: OUT/checkpoints/step-N with the trainable weights (safetensors), optimizer and
scheduler state (torch.save of plain tensors/numbers, read back with weights_only=True), every
rank's RNG states, and the data position. Written to a temporary directory and renamed, so a
kill mid-write never leaves a half checkpoint that resume would pick up; a checkpoint damaged later
(truncated by a full disk, a bad copy) is skipped on resume with a warning, for the one before it."""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d+)$")
log = logging.getLogger("shear")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (all of them for full fine-tuning; adapters + projections for LoRA)."""
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    st = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
          "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuplify(st["python"]))
    np_st = st["numpy"]
    np.random.set_state((np_st[0], np.array(np_st[1], dtype=np.uint32), *np_st[2:]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").exists()]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, module, optimizer, scheduler, state: dict, root: Path, keep: int) -> Path:
    """Collective: every rank calls it. Rank 0 writes weights/optimizer/state, each rank its RNG."""
    root = Path(root)
    step = int(state["step"])
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        if _is_deepspeed(accelerator):
            module.save_checkpoint(str(tmp), tag="ds", client_state={})  # sharded states, collective
        elif accelerator.is_main_process:
            save_file(trainable_state(accelerator.unwrap_model(module)), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
    except (OSError, RuntimeError) as e:
        raise _write_failed(e, root, tmp, step) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks completeness
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


#: free bytes under which a failed checkpoint write is taken for a full disk (torch.save reports one as
#: "PytorchStreamWriter failed writing file ... file write failed" / "enforce fail at inline_container.cc")
DISK_FULL_BYTES = 256 * 2**20


def _write_failed(e: BaseException, root: Path, tmp: Path, step: int) -> BaseException:
    """The error to raise for a checkpoint write that failed: the partial ``tmp`` is removed; a full disk
    (ENOSPC, or little space left) becomes one OSError(ENOSPC) naming the directory and the fix."""
    import errno

    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(root).free
    if not (isinstance(e, OSError) and e.errno == errno.ENOSPC) and free >= DISK_FULL_BYTES:
        return e
    kept = list_checkpoints(root)
    have = f"the newest complete checkpoint, {kept[-1][1].name}, is kept" if kept else "no earlier checkpoint exists"
    return OSError(errno.ENOSPC, f"{root}: the disk is full while writing checkpoint step-{step} ({free / 2**20:.0f} "
                                 f"MB free; {have}); free space, or lower train.keep_checkpoints, then run again "
                                 "to resume")


def load_checkpoint(accelerator, module, optimizer, scheduler, path: Path) -> dict:
    """Restore everything save_checkpoint wrote; returns the saved trainer state (step, history).

    Every file is read before anything is restored, so a truncated file raises with the model untouched.
    """
    path = Path(path)
    data = None if _is_deepspeed(accelerator) else read_checkpoint(path, accelerator.process_index)
    return _restore(accelerator, module, optimizer, scheduler, path, data)


def _restore(accelerator, module, optimizer, scheduler, path: Path, data: dict | None) -> dict:
    if data is None:  # DeepSpeed: its engine reads its own sharded files
        module.load_checkpoint(str(path), tag="ds")
        data = {"scheduler": torch.load(path / "scheduler.pt", weights_only=True),
                **_read_small(path, accelerator.process_index)}
    else:
        _load_weights(accelerator.unwrap_model(module), data["weights"], path)
        optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    if data["rng"] is not None:
        set_rng_state(data["rng"])
    return data["state"]


def read_checkpoint(path: Path, process_index: int = 0) -> dict:
    """The files of a (non-DeepSpeed) checkpoint in memory: weights, optimizer, scheduler, rng, state."""
    path = Path(path)
    return {"weights": load_file(str(path / "trainable.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
            **_read_small(path, process_index)}


def _read_small(path: Path, process_index: int) -> dict:
    rng_file = path / f"rng-{process_index}.json"
    return {"rng": json.loads(rng_file.read_text()) if rng_file.exists() else None,
            "state": json.loads((path / "state.json").read_text())}


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint {path}: no weights for {missing[:3]}... (was it made by another setup?)")
    for n, w in weights.items():
        if n not in params or params[n].shape != w.shape:
            have = tuple(params[n].shape) if n in params else "no such parameter"
            raise ValueError(f"checkpoint {path}: {n} has shape {tuple(w.shape)}, the model {have}: it was made "
                             "by a differently shaped model (another prune setting?); start over (shear run --restart)")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def resume_checkpoint(accelerator, module, optimizer, scheduler, root: Path) -> tuple[Path | None, dict | None]:
    """Restore the newest readable checkpoint under ``root``: ``(its path, trainer state)``, or (None, None).

    A truncated or corrupt checkpoint (a file that does not read back) is skipped with a warning that
    names it, and the previous one is used. Every rank takes the same decision.
    """
    for _, path in reversed(list_checkpoints(root)):
        problem, data = None, None
        if not _is_deepspeed(accelerator):
            try:
                data = read_checkpoint(path, accelerator.process_index)
            except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
                problem = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        bad = torch.tensor([float(problem is not None)], device=accelerator.device)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, "sum")
        if bad.item() > 0:
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous checkpoint",
                        path, problem or "on another process")
            continue
        return path, _restore(accelerator, module, optimizer, scheduler, path, data)
    if list_checkpoints(root):
        log.warning("no readable checkpoint in %s: training starts from step 0", root)
    return None, None


def _is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")
