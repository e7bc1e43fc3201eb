"""Write safetensors shards one tensor at a time, knowing every tensor's name, shape and dtype up front.

    w = ShardWriter(tmp_dir, {"model.embed_tokens.weight": ([128, 64], torch.bfloat16), ...}, "5GB")
    w.write("model.embed_tokens.weight", tensor)     # in the declared order, as the tensors are made
    w.close()                                         # model.safetensors, or shards + model.safetensors.index.json

The shards are planned as ``save_pretrained`` plans them (huggingface_hub's splitter, the same file names
and index), and each shard's header is written when the shard is opened, so a tensor goes to disk the moment
it exists and no shard is ever held in memory: a streamed export holds one block at a time.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from shear.checkpoint import INDEX, ST_DTYPES

_NAMES = {v: k for k, v in ST_DTYPES.items()}


def _nbytes(spec) -> int:
    shape, dtype = spec
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """Shards of ``specs`` (``{name: (shape, dtype)}``, in the order :meth:`write` will be called) under ``out``."""

    def __init__(self, out: str | Path, specs: dict, max_shard_size: int | str):
        from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

        self.out, self.specs = Path(out), dict(specs)
        split = split_state_dict_into_shards_factory(
            self.specs, get_storage_size=_nbytes, get_storage_id=lambda _s: None,
            filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
        self.split = split
        order = {k: i for i, k in enumerate(self.specs)}
        # within a file, tensors are laid out in the order they are written
        self.pending = {f: sorted(ks, key=order.__getitem__) for f, ks in split.filename_to_tensors.items()}
        self.handles: dict = {}
        self.total = sum(_nbytes(s) for s in self.specs.values())

    def _open(self, fname: str):
        header, off = {}, 0
        for k in self.pending[fname]:
            shape, dtype = self.specs[k]
            n = _nbytes(self.specs[k])
            header[k] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        fh = open(self.out / fname, "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        return fh

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (exactly the declared shape and dtype) to its shard; a shard is closed when full."""
        shape, dtype = self.specs[name]
        if list(tensor.shape) != list(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: declared {list(shape)} {dtype}, got {list(tensor.shape)} {tensor.dtype}")
        fname = self.split.tensor_to_filename[name]
        queue = self.pending[fname]
        if not queue or queue[0] != name:
            raise ValueError(f"{name}: written out of order (next in {fname}: {queue[0] if queue else 'nothing'})")
        fh = self.handles.get(fname) or self.handles.setdefault(fname, self._open(fname))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            fh.write(memoryview(data.view(torch.uint8).numpy()))
        queue.pop(0)
        if not queue:
            fh.close()
            del self.handles[fname]

    def close(self) -> list[str]:
        """Check that every tensor was written, write the index (several shards); return the files written."""
        left = [k for q in self.pending.values() for k in q]
        for fh in self.handles.values():
            fh.close()
        if left:
            raise RuntimeError(f"shards: {len(left)} tensors never written (first {left[0]})")
        files = sorted(self.split.filename_to_tensors)
        if len(files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.split.tensor_to_filename.items()))}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            files.append(INDEX)
        return files
