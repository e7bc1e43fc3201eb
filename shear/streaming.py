"""Glue shared by the streamed commands (``shear sparsify --stream``, ``shear prune --stream``): what a streamed
export writes, per block, and the reads and passes that hold one decoder block at a time.

    specs = tensor_specs(model, ckpt, torch.bfloat16)         # {name: (checkpoint key, shape, dtype written)}
    outside, per_block = group_by_block(specs, "model.layers", 32)
    run = BlockStream(model, ckpt, specs, writer, batch_size=8, device="cpu")
    hidden, kws = run.capture(outside, ids)                   # block 0's inputs, every block's kwargs
    materialize_(block, run.read(per_block[i], prefix))       # one block's tensors from the shards
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from shear.checkpoint import Checkpoint, materialize_, release_
from shear.memory import trim
from shear.models import check_finite

log = logging.getLogger("shear")


def tensor_specs(model: nn.Module, ckpt: Checkpoint, written: torch.dtype, new=frozenset(),
                 what: str = "--stream") -> dict[str, tuple]:
    """``{name: (checkpoint key or None, shape, dtype written)}`` of what ``save_pretrained`` writes: the model's
    state dict, tied weights once. Floating parameters get ``written`` (those the class keeps in fp32 stay
    fp32, as :func:`shear.models.cast_weights_` leaves them), buffers and integer tensors their own dtype. A
    parameter missing from the checkpoint is refused, unless it is in ``new`` (made by the command: a
    compensation bias); a persistent buffer missing from it is the model's own."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    params = {id(p) for p in model.parameters()}
    seen, out, missing = set(), {}, []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight (the LM head of tie_word_embeddings): written once
            continue
        seen.add(id(t))
        key = ckpt.key_for(model, name)
        is_param = id(t) in params
        if key is None and is_param and name not in new:
            missing.append(name)
            continue
        dtype = t.dtype
        if is_param and t.is_floating_point() and not (written != torch.float32 and any(k in name for k in keep)):
            dtype = written
        elif key is not None and not t.is_floating_point():
            dtype = ckpt.dtype(key)
        out[name] = (key, list(t.shape), dtype)
    if missing:
        raise ValueError(f"{ckpt.path}: {len(missing)} of the model's tensors are not in the checkpoint under its "
                         f"names (first {missing[0]!r}); {what} reads checkpoints whose names are the model's")
    unused = sorted(set(ckpt.files) - {k for k, _, _ in out.values()})
    if unused:  # what from_pretrained reports as unexpected keys and does not load either
        log.warning("%s: %d tensors of the checkpoint are not the model's and are not written: %s",
                    what, len(unused), ", ".join(unused[:4]))
    return out


def group_by_block(specs: dict, path: str, n_blocks: int) -> tuple[list[str], list[list[str]]]:
    """The names outside the blocks, and per block its names (in state-dict order)."""
    outside, blocks = [], [[] for _ in range(n_blocks)]
    for name in specs:
        if name.startswith(path + "."):
            i = int(name[len(path) + 1:].split(".", 1)[0])
            blocks[i].append(name)
        else:
            outside.append(name)
    return outside, blocks


class BlockStream:
    """The steps of one streamed run: what it reads (``ckpt``), the skeleton it fills (``model``), what it
    writes (``specs``: ``{name: (checkpoint key, shape, dtype written)}``, into ``writer``)."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, specs: dict, writer, batch_size: int, device):
        self.model, self.ckpt, self.specs, self.writer = model, ckpt, specs, writer
        self.batch_size, self.device = batch_size, device

    def read(self, names: list[str], strip: str = "", specs: dict | None = None, written: bool = False) -> dict:
        """``{name without strip: tensor}``: from the checkpoint, else (a buffer) the skeleton's own; floating
        tensors cast while read (:meth:`Checkpoint.read`) to the skeleton's dtype of that name (``written``: to
        the dtype written). ``specs``: where the names' checkpoint keys are (default: what this run writes)."""
        specs = self.specs if specs is None else specs
        keys = {n: specs[n][0] for n in names}
        state = self.model.state_dict(keep_vars=True)
        dtypes = {k: (specs[n][2] if written else state[n].dtype) for n, k in keys.items()
                  if k is not None and (written or n in state)}
        got = self.ckpt.read([k for k in keys.values() if k is not None], dtypes)
        return {n[len(strip):]: (got[k] if k is not None else state[n].detach()) for n, k in keys.items()}

    def capture(self, outside: list[str], ids: torch.Tensor) -> tuple[list, list]:
        """Block inputs and kwargs of the calibration ids (``capture_block_inputs``), with the tensors outside
        the blocks read in for the pass and freed after it (not the LM head: the pass stops at the last block)."""
        from shear.importance.calibrate import capture_block_inputs

        model = self.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb = model.get_input_embeddings()
        skip = {n for n, p in model.named_parameters(remove_duplicate=False)
                if head is not None and p is head.weight and p is not emb.weight}
        names = [n for n in outside if n not in skip]
        materialize_(model, self.read(names), self.device, complete=False)
        try:
            return capture_block_inputs(model, ids, self.batch_size)
        finally:
            release_(model, set(names))
            trim()

    def copy(self, names: list[str]) -> None:
        """Write tensors outside the blocks as stored (cast to the written dtype), one at a time."""
        for name in names:
            t = self.read([name], written=True)[name]
            check_finite([(name, t)], f"{self.ckpt.path}: weight", "the checkpoint is damaged")
            self.writer.write(name, t.to(self.specs[name][2]))

    def write_block(self, block: nn.Module, prefix: str, names: list[str]) -> None:
        """Write ``block``'s tensors (``names``: full names, in order) in their written dtype, then put it back on
        meta and give its memory back (a gc pass and malloc_trim: else RSS grows block by block)."""
        state = block.state_dict(keep_vars=True)
        for name in names:
            self.writer.write(name, state[name[len(prefix):]].detach().to(self.specs[name][2]))
        del state
        release_(block)
        trim()


def write_config(model: nn.Module, src: Path, tmp: Path, written: torch.dtype) -> None:
    """``config.json`` as ``save_pretrained`` writes it (the dtype the weights are written in), and the
    checkpoint's ``generation_config.json`` (else the model's own, for a model that generates)."""
    model.config.dtype = written
    model.config.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
    elif model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
