"""A checkpoint read one tensor group at a time: the model's skeleton on the meta device, tensors from the
safetensors shards put into it where they are needed and taken out again (glue for streamed passes).

    ckpt = Checkpoint(path)                          # model.safetensors, or shards + model.safetensors.index.json
    model = skeleton(path, torch.float32)            # parameters on meta, buffers (RoPE inv_freq) computed
    materialize_(block, ckpt.read(names), "cpu")     # real tensors for one block, in the model's dtype
    release_(block)                                  # back to meta: its memory is freed

Shards are opened (memory-mapped by ``safetensors.safe_open``) only for the duration of one ``read`` and closed
after it, so the pages touched stay out of the process's resident set between blocks.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
READ_CHUNK = 64 << 20  #: bytes of stored rows per step of a cast read
#: safetensors dtype names <-> torch dtypes (the floating ones and the integer ones models store)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def _header(f: Path) -> tuple[dict, int]:
    """A safetensors file's header and the offset its data starts at."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


class Checkpoint:
    """The tensors of a local safetensors checkpoint by name: ``files[name]``, ``shape(name)``, ``dtype(name)``.

    The weight map comes from ``model.safetensors.index.json`` when present, else from every ``*.safetensors``
    header in the directory (one file or shards without an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors weights (streaming reads safetensors only)")
            weight_map = None
        self.files: dict[str, str] = {}
        self.meta: dict[str, tuple[list[int], torch.dtype]] = {}
        self.where: dict[str, tuple[int, int]] = {}  # key -> (first byte, end) in its file
        for name in files:
            header, start = _header(self.path / name)
            for key, t in header.items():
                if key == "__metadata__" or (weight_map is not None and weight_map.get(key) != name):
                    continue
                if t["dtype"] not in ST_DTYPES:
                    raise ValueError(f"{self.path / name}: tensor {key} has dtype {t['dtype']}, which streaming "
                                     "does not read")
                self.files[key] = name
                self.meta[key] = (list(t["shape"]), ST_DTYPES[t["dtype"]])
                self.where[key] = (start + t["data_offsets"][0], start + t["data_offsets"][1])
        missing = sorted(set(weight_map or {}) - set(self.files))
        if missing:
            raise ValueError(f"{index}: {missing[0]} is listed in {weight_map[missing[0]]} but not stored there")

    def shape(self, key: str) -> list[int]:
        return self.meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key][1]

    def read(self, keys, dtypes: dict | None = None) -> dict[str, torch.Tensor]:
        """``{key: tensor}``, each file opened once and closed after: as stored, or (``dtypes``: ``{key: dtype}``)
        a floating tensor cast to its dtype while it is read.

        Read with plain file reads into the tensor's own memory, not memory-mapped: the pages of a mapped file
        count in the process's resident set while it is open, so an 8B model's 1 GB of bf16 embeddings read
        through a mapping sat beside their 2.1 GB fp32 cast. A cast goes through a buffer of a few rows."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with open(self.path / name, "rb", buffering=0) as fh:
                for k in ks:
                    want, have = (dtypes or {}).get(k), self.dtype(k)
                    if want is None or not (want.is_floating_point and have.is_floating_point):
                        want = have
                    out[k] = self._read_one(fh, k, want)
        return out

    def _read_one(self, fh, key: str, dtype: torch.dtype) -> torch.Tensor:
        shape, stored = self.meta[key]
        a, b = self.where[key]
        out = torch.empty(shape, dtype=dtype)
        if out.numel() == 0:
            return out
        fh.seek(a)
        if dtype == stored:
            read_into(fh, out, b - a, key)
            return out
        rows = out.reshape(out.shape[0] if out.dim() else 1, -1)
        per_row = rows.shape[1] * torch.empty((), dtype=stored).element_size()
        step = max(1, READ_CHUNK // per_row)
        buf = torch.empty(min(step, rows.shape[0]), rows.shape[1], dtype=stored)
        for r in range(0, rows.shape[0], step):
            part = buf[: min(step, rows.shape[0] - r)]
            read_into(fh, part, part.numel() * part.element_size(), key)
            rows[r:r + part.shape[0]].copy_(part)
        return out

    def key_for(self, model: nn.Module, name: str) -> str | None:
        """The checkpoint key holding the model's tensor ``name``: the same name, or the name without (or with)
        the base model's prefix (GPT-2 checkpoints saved from ``GPT2Model`` store ``h.0...``, not
        ``transformer.h.0...``), as ``from_pretrained`` matches them; None when absent."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        cands = [name]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        elif prefix:
            cands.append(f"{prefix}.{name}")
        return next((c for c in cands if c in self.files), None)


def read_into(fh, t: torch.Tensor, nbytes: int, key: str) -> None:
    """Read ``nbytes`` from ``fh`` into the contiguous tensor ``t``'s memory (safetensors is little-endian)."""
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    if view.nbytes != nbytes:
        raise ValueError(f"{key}: {nbytes} bytes stored for {view.nbytes} bytes of {list(t.shape)} {t.dtype}")
    got = 0
    while got < nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise ValueError(f"{key}: the file ends {nbytes - got} bytes before the tensor does (truncated shard)")
        got += n


def skeleton(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The model ``path``'s config builds (its own class, :func:`shear.models.auto_class_for`), in eval mode,
    with every parameter on the meta device and the buffers computed on the CPU (rotary ``inv_freq``):
    no weight is read, no memory is taken by them."""
    import transformers
    from accelerate import init_empty_weights

    from shear.models import auto_class_for, check_remote_code

    path = str(path)
    check_remote_code(path, trust_remote_code)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = getattr(transformers, auto_class_for(config))
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # not done on meta by from_config: the LM head of tie_word_embeddings IS the embedding
    return model.eval()


def _owners(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(tensor): [(module, attribute), ...]}``: every place a parameter or buffer sits (tied ones twice)."""
    out: dict[int, list] = {}
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for leaf, t in store.items():
                if t is not None:
                    out.setdefault(id(t), []).append((mod, leaf))
    return out


def _set(owners: dict, old: torch.Tensor, value: torch.Tensor) -> None:
    """Replace ``old`` with ``value`` everywhere it sits, so tied weights stay tied."""
    for mod, leaf in owners[id(old)]:
        if leaf in mod._parameters:
            mod._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
            value = mod._parameters[leaf]
        else:
            mod._buffers[leaf] = value


def materialize_(module: nn.Module, tensors: dict[str, torch.Tensor], device="cpu", complete: bool = True) -> None:
    """Put ``tensors`` (``{name relative to module: tensor}``) into ``module`` in the dtype of the skeleton's
    tensor of that name, on ``device`` (a tied weight is set in every place it sits). With ``complete``, a
    parameter still on meta afterwards is an error naming it."""
    own = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    owners = _owners(module)
    for name, t in tensors.items():
        ref = own[name]
        if list(t.shape) != list(ref.shape):
            raise ValueError(f"{name}: the checkpoint stores shape {list(t.shape)}, the model's config builds "
                             f"{list(ref.shape)}")
        _set(owners, ref, t.to(device=device, dtype=ref.dtype if ref.is_floating_point() else t.dtype))
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if complete and left:
        raise ValueError(f"{left[0]}: not in the checkpoint ({len(left)} parameters missing)")


def release_(module: nn.Module, names=None) -> None:
    """Put ``module``'s parameters (or only ``names``) back on the meta device: their memory is freed."""
    owners = _owners(module)
    for name, p in list(module.named_parameters()):
        if names is None or name in names:
            _set(owners, p, torch.empty_like(p, device="meta"))
