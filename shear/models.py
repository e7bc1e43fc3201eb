"""Loading models and tokenizers, and the reference models trained on the embedded corpus.

The reference models are Llama with GQA (SwiGLU MLP, RMSNorm, RoPE), small enough to train on two
CPU cores. They give shear a real, trained model to prune offline; ``reference`` is the benchmark
model, ``reference-quick`` serves ``shear quickstart``. Both share one BPE tokenizer (vocab 2048)
trained on the corpus's train split.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

REFERENCE_ARCHS = {
    # 5.0M parameters: hidden 256, 6 layers, 8 query heads / 2 KV heads of 32, MLP 640.
    "reference": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, intermediate_size=640),
    # 1.3M parameters: hidden 128, 4 layers, 4 query heads / 2 KV heads of 32, MLP 384.
    "reference-quick": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, intermediate_size=384),
}
REFERENCE_VOCAB = 2048

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where shear keeps models it makes: ``$SHEAR_CACHE`` or ``~/.cache/shear``."""
    return Path(os.environ.get("SHEAR_CACHE", Path.home() / ".cache" / "shear")).expanduser()


def reference_config(name: str = "reference", vocab_size: int = REFERENCE_VOCAB, **over):
    """The LlamaConfig of a reference model (``reference`` or ``reference-quick``)."""
    from transformers import LlamaConfig

    if name not in REFERENCE_ARCHS:
        raise ValueError(f"unknown reference model {name!r}; expected one of {sorted(REFERENCE_ARCHS)}")
    kw = dict(REFERENCE_ARCHS[name], vocab_size=vocab_size, max_position_embeddings=1024,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=0, pad_token_id=1, torch_dtype="float32")
    kw.update(over)
    return LlamaConfig(**kw)


def resolve_model_path(path: str) -> str:
    """Map ``reference``/``reference-quick`` to their cache directories; other paths pass through."""
    if path in REFERENCE_ARCHS:
        p = cache_dir() / "models" / path
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"reference model {path!r} is not built yet ({p}); build it with "
                f"`shear run recipes/reference/{'pretrain' if path == 'reference' else 'quick'}.yaml` "
                "or `shear quickstart`")
        return str(p)
    return path


def needs_remote_code(path: str) -> bool:
    """True when a local model directory declares its own modeling code (per-layer pruned exports)."""
    import json

    cfg = Path(path) / "config.json"
    return cfg.exists() and "auto_map" in json.loads(cfg.read_text())


def check_local(path: str) -> None:
    """Fail clearly on a local path that is missing or not a model directory (hub ids pass through:
    ``org/name`` has one slash and no leading ``/``, ``.`` or ``~``)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local} has no config.json: not a model directory")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"model directory not found: {local}")


def load_model(path: str, dtype: str = "fp32", device: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` on a hub name or directory, in eval mode.

    Per-layer pruned exports carry their modeling file (``auto_map``); only those are loaded with
    ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    check_local(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=needs_remote_code(path))
    if device:
        model.to(device)
    return model.eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    check_local(path)
    return AutoTokenizer.from_pretrained(path)
