"""Checkpoints: OUT/checkpoints/step-N with the trainable weights (safetensors), optimizer and
scheduler state (torch.save of plain tensors/numbers, read back with weights_only=True), every
rank's RNG states, and the data position. Written to a temporary directory and renamed, so a
kill mid-write never leaves a half checkpoint that resume would pick up."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d+)$")


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
    if _is_deepspeed(accelerator):
        module.save_checkpoint(str(tmp), tag="ds", client_state={})  # sharded states, collective
    elif accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(module)), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks completeness
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, module, optimizer, scheduler, path: Path) -> dict:
    """Restore everything save_checkpoint wrote; returns the saved trainer state (step, history)."""
    path = Path(path)
    if _is_deepspeed(accelerator):
        module.load_checkpoint(str(path), tag="ds")
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(accelerator.unwrap_model(module).named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing:
            raise ValueError(f"checkpoint {path}: no weights for {missing[:3]}... (was it made by another setup?)")
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "state.json").read_text())


def _is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")
