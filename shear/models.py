"""Loading models and tokenizers, and the reference models trained on the embedded corpus.

The reference models are Llama with GQA (SwiGLU MLP, RMSNorm, RoPE), small enough to train on two
CPU cores. They give shear a real, trained model to prune offline; ``reference`` was the first
benchmark model, ``reference-quick`` serves ``shear quickstart``. Both share one BPE tokenizer (vocab
2048) trained on the corpus's train split. ``reference-teacher`` (reference-quick's architecture
trained to convergence) ships inside the package and is the benchmark teacher (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from shear.storage import EXPORT_DTYPES

log = logging.getLogger("shear")

REFERENCE_ARCHS = {
    # 5.0M parameters: hidden 256, 6 layers, 8 query heads / 2 KV heads of 32, MLP 640.
    "reference": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, intermediate_size=640),
    # 1.3M parameters: hidden 128, 4 layers, 4 query heads / 2 KV heads of 32, MLP 384.
    "reference-quick": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, intermediate_size=384),
}
REFERENCE_VOCAB = 2048
# Models shipped inside the package (no cache build needed): the benchmark teacher, reference-quick's
# architecture pretrained to convergence by recipes/reference/pretrain-teacher.yaml, stored in fp16.
SHIPPED_MODELS = {"reference-teacher": Path(__file__).parent / "teachers" / "reference-teacher"}

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: safetensors header dtypes -> shear's names (other dtypes: not weights we cast)
_ST_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


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


def resolve_device(device: str | None) -> str | None:
    """A device name as this process should read it. ``auto``: this rank's GPU when CUDA is available, else
    None (stay where the model is), so one recipe runs on a GPU node and on a CPU machine alike. A bare
    ``cuda`` (or ``auto``) under a multi-process launch (``accelerate launch`` / ``torchrun`` set LOCAL_RANK)
    is ``cuda:<LOCAL_RANK>``, the GPU accelerate gives that rank; without the index every rank would use GPU 0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def resolve_model_path(path: str) -> str:
    """Map ``reference``/``reference-quick`` to their cache directories and ``reference-teacher`` to the
    package's own copy; other paths pass through."""
    if path in SHIPPED_MODELS:
        p = SHIPPED_MODELS[path]
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"shipped model {path!r} is missing from this installation ({p}); "
                                    "reinstall shear, or rebuild it with "
                                    "`shear run recipes/reference/pretrain-teacher.yaml`")
        return str(p)
    if path in REFERENCE_ARCHS:
        p = cache_dir() / "models" / path
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"reference model {path!r} is not built yet ({p}); build it with "
                f"`shear run recipes/reference/{'pretrain' if path == 'reference' else 'quick'}.yaml` "
                "or `shear quickstart`")
        return str(p)
    return st_transformer_dir(path)


ST_TRANSFORMER = "sentence_transformers.models.Transformer"


def st_transformer_dir(path: str) -> str:
    """A sentence-transformers directory that keeps its transformer in a subfolder (``modules.json`` naming
    a Transformer module at ``0_Transformer/``, the older layout, no ``config.json`` at the top) -> that
    subfolder; any other path unchanged. The export writes the modern layout (transformer at the top)."""
    local = Path(path).expanduser()
    if not (local / "modules.json").is_file() or (local / "config.json").exists():
        return path
    mods = read_json(local / "modules.json")
    subs = [str(m.get("path", "")) for m in mods if m.get("type") == ST_TRANSFORMER and m.get("path")]
    if len(subs) == 1 and "/" not in subs[0] and (local / subs[0] / "config.json").is_file():
        return str(local / subs[0])
    return path


def read_json(path: str | Path) -> dict:
    """A JSON file of a model directory; a damaged one is an error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"{path}: not valid JSON ({where}); restore the file (download or export the model "
                         "again)") from None


# Files whose ``auto_map`` names code shipped in the directory, and what that code builds.
CODE_FILES = {"config.json": "modeling code (auto_map: per-layer pruned export)",
              "tokenizer_config.json": "tokenizer code (auto_map in tokenizer_config.json)"}
CONSENT = "pass --trust-remote-code (or model.trust_remote_code: true) to run it"


def needs_remote_code(path: str, file: str = "config.json") -> bool:
    """True when ``file`` of a local directory declares code of its own (``auto_map``; per-layer pruned
    exports in ``config.json``, custom tokenizers in ``tokenizer_config.json``), never by ``model_type``."""
    f = Path(path).expanduser() / file
    return f.is_file() and "auto_map" in read_json(f)


def check_remote_code(path: str, trust_remote_code: bool, files: tuple[str, ...] = ("config.json",)) -> None:
    """Refuse a directory whose ``files`` carry their own code unless the user consented to run it.

    Loaders also pass ``trust_remote_code`` to transformers explicitly: ``None`` would make it ask on stdin
    (y/N, 15 s) instead of refusing, so consent is the flag alone."""
    for f in files:
        if not trust_remote_code and needs_remote_code(path, f):
            raise ValueError(f"{path} carries its own {CODE_FILES[f]}; {CONSENT}")


# Sizes transformers fills with its defaults (a 7B model's) when config.json lacks them.
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")


def missing_size_keys(path: str | Path, config) -> list[str]:
    """The :data:`SIZE_KEYS` of ``config``'s class that ``path/config.json`` does not set (under their
    name or the family's alias, e.g. GPT-2's ``n_embd``)."""
    raw, alias = read_json(Path(path) / "config.json"), getattr(config, "attribute_map", None) or {}
    return [k for k in SIZE_KEYS if hasattr(config, k) and k not in raw and alias.get(k) not in raw]


def check_local(path: str) -> None:
    """Fail clearly on a local path that is missing or not a model directory (hub ids pass through:
    ``org/name`` has one slash and no leading ``/``, ``.`` or ``~``)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local} has no config.json: not a model directory")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"model directory not found: {local}")


# Auto classes tried, in order, for a checkpoint's ``architectures[0]``: the first whose mapping gives that
# class loads it (BertModel -> AutoModel, BertForMaskedLM -> AutoModelForMaskedLM, *ForCausalLM -> causal).
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")


def auto_class_for(config) -> str:
    """The Auto class that loads the checkpoint as what it is, from ``config.architectures``.

    A per-layer export names it in ``auto_map``; a stock checkpoint names its class in
    ``architectures`` (an encoder saved as ``BertModel`` is loaded by ``AutoModel``, pooler kept, no
    LM head added). Without ``architectures`` the model is loaded as a causal LM, as before.
    """
    import transformers

    auto_map = getattr(config, "auto_map", None) or {}
    for name in AUTO_CLASSES:
        if name in auto_map:
            return name
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    for name in AUTO_CLASSES:
        mapping = getattr(transformers, name)._model_mapping
        if cls is not None and type(config) in mapping and mapping[type(config)] is cls:
            return name
    return "AutoModelForCausalLM"


def load_model(path: str, dtype: str = "fp32", device: str | None = None, trust_remote_code: bool = False,
               device_map: str | dict | None = None):
    """``from_pretrained`` on a hub name or directory, in eval mode, with the Auto class that gives the
    checkpoint's own class (:func:`auto_class_for`; causal LMs: ``AutoModelForCausalLM``).

    ``device_map`` (e.g. ``"auto"``) spreads a model larger than one GPU over the devices there are
    (accelerate's big-model loading); scoring then streams blocks where they sit.

    Per-layer pruned exports carry their modeling file (``auto_map``); they load only with
    ``trust_remote_code=True`` (the user's consent), otherwise that is an error naming the directory.
    """
    import transformers

    path = resolve_model_path(path)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    check_local(path)
    check_weights(path)
    check_remote_code(path, trust_remote_code)
    if device and device_map is not None:
        raise ValueError("model.device_map and a device are exclusive: device_map places the model itself")
    extra = {} if device_map is None else {"device_map": device_map}
    with _clear_errors(path):
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if Path(path).is_dir() and missing_size_keys(path, config):  # defaults assumed: do they fit the weights?
            check_config_sizes(Path(path), meta_model(path, trust_remote_code))
        auto = getattr(transformers, auto_class_for(config))
        try:
            model = auto.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra)
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            raise ValueError(f"{path}: config.json does not describe the weights (tensor shapes differ); fix its "
                             "sizes (`shear analyze DIR` names the first tensor that differs)") from None
    from shear.multimodal import text_only

    model = text_only(model)  # Gemma 3 vision-language checkpoints: the language model, as a causal LM
    if device:
        model.to(device)
    from shear.memory import trim

    trim()  # the loader's temporaries (shards read, dtype conversions) back to the OS
    return model.eval()


def checkpoint_dtype(path: str) -> str | None:
    """The dtype a checkpoint is stored in (``fp32``/``bf16``/``fp16``), None when unknown.

    A local directory: the floating dtype holding most bytes in its ``*.safetensors`` headers (what is on
    disk), else ``dtype``/``torch_dtype`` in its ``config.json``; a hub name: its config's dtype.
    """
    import json

    path = resolve_model_path(path)
    local = Path(path).expanduser()
    if local.is_dir():
        by = {}
        for f in local.glob("*.safetensors"):
            for name, n in _safetensors_bytes(f).items():
                by[name] = by.get(name, 0) + n
        if by:
            return max(by, key=by.get)
        cfg = local / "config.json"
        d = json.loads(cfg.read_text()) if cfg.is_file() else {}
        found = d.get("dtype") or d.get("torch_dtype")
    else:
        try:
            import transformers

            found = getattr(transformers.AutoConfig.from_pretrained(path), "dtype", None)
        except Exception:  # noqa: BLE001 - unknown stays unknown; load_model reports the real error
            return None
    found = DTYPES.get(found.removeprefix("torch.")) if isinstance(found, str) else found
    return SHORT.get(found)


def _safetensors_bytes(f: Path) -> dict:
    """``{dtype: bytes}`` of the floating tensors in a safetensors file, read from its header only."""
    import json
    import struct

    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return {}
    out: dict = {}
    for name, t in header.items():
        if name != "__metadata__" and isinstance(t, dict) and t.get("dtype") in _ST_DTYPES:
            start, end = t["data_offsets"]
            out[_ST_DTYPES[t["dtype"]]] = out.get(_ST_DTYPES[t["dtype"]], 0) + end - start
    return out


def source_weight_bytes(path: str) -> int | None:
    """Bytes of a local checkpoint's ``*.safetensors`` files on disk (None: not a local directory, or none)."""
    local = Path(resolve_model_path(path)).expanduser()
    files = list(local.glob("*.safetensors")) if local.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def export_dtype(choice: str, source: str | None, model=None) -> str:
    """The dtype written weights get: ``choice``, or for ``auto`` the checkpoint's (:func:`checkpoint_dtype` of
    ``source``), else the model's parameters' (a model built from scratch), else fp32."""
    if choice not in EXPORT_DTYPES:
        raise ValueError(f"dtype {choice!r}: expected one of {list(EXPORT_DTYPES)}")
    if choice != "auto":
        return choice
    found = checkpoint_dtype(source) if source is not None else None
    if found is None and model is not None:
        found = SHORT.get(next((p.dtype for p in model.parameters() if p.is_floating_point()), None))
    return found or "fp32"


def load_dtype(written: str, checkpoint: str | None, device: str | None = None) -> str:
    """The dtype to load a checkpoint in, given the dtype its result is ``written`` in.

    The checkpoint's own dtype (half the memory of fp32 for bf16/fp16) when the result is written in it and
    the work runs on a GPU; otherwise fp32, as always: on CPUs fp16 matmuls are ~100x slower than fp32 and
    bf16 ones are fast only with AVX-512 bf16 units, and a result written wider than its checkpoint keeps
    the precision of fp32 updates (SparseGPT, OBS, compensation). Statistics are fp32 either way.
    """
    if checkpoint == written and (written == "fp32" or str(device or "").startswith("cuda")):
        return written
    return "fp32"


def cast_weights_(model, dtype: str | None) -> None:
    """Cast ``model``'s floating parameters to ``dtype`` in place (None: keep); the config's dtype follows.

    Buffers (RoPE's ``inv_freq``) and modules the class keeps in fp32 (``_keep_in_fp32_modules``) stay as
    they are, as ``from_pretrained(dtype=...)`` leaves them, so the model in memory is the model that reloads.
    Tied weights stay tied (one Parameter). Freed memory is returned to the OS.
    """
    if dtype is None:
        return
    target = DTYPES[dtype]
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    changed = False
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.dtype == target:
            continue
        if target != torch.float32 and any(k in name for k in keep):  # transformers matches substrings
            continue
        p.data = p.data.to(target)
        changed = True
    if hasattr(getattr(model, "config", None), "dtype"):
        model.config.dtype = target
    if changed:
        from shear.memory import trim

        trim()


def check_weights(path: str) -> None:
    """Fail clearly on a local model directory that has a config but no weights file."""
    local = Path(path).expanduser()
    if local.is_dir() and not any(next(local.glob(pat), None) for pat in WEIGHT_FILES):
        raise FileNotFoundError(f"{local} has a config.json but no weights (*.safetensors or *.bin); "
                                "only `shear analyze` works on a config-only directory")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


@contextmanager
def _clear_errors(path: str):
    """Re-raise failures of ``from_pretrained`` we know (offline hub, corrupt weights) as one line naming ``path``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - unknown errors are re-raised unchanged
        err = _load_error(path, e)
        if err is e:
            raise
        raise err from e


def _load_error(path: str, e: Exception) -> Exception:
    """The user-facing error for a failed ``from_pretrained`` (``e`` itself when it is not one we know)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, ValueError) and "trust_remote_code=True" in str(e):
        return ValueError(f"{path} carries its own code (auto_map); {CONSENT}")
    if type(e).__name__ == "SafetensorError" or isinstance(e, (EOFError, pickle.UnpicklingError)):
        return ValueError(f"{path}: corrupt or truncated weights file ({first})")
    if isinstance(e, OSError) and not Path(path).expanduser().exists():
        if _hub_offline():
            return FileNotFoundError(f"{path}: not a local directory, and the hub is offline (HF_HUB_OFFLINE=1); "
                                     "download the model first or give a local path")
        return FileNotFoundError(f"{path}: not a local directory and not loadable from the hub ({first})")
    return e


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
# JSON files a tokenizer load reads (config.json: the tokenizer class of some models).
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "config.json")


def has_tokenizer(path: str) -> bool:
    """True when a local directory holds tokenizer files."""
    local = Path(resolve_model_path(path)).expanduser()
    return local.is_dir() and any((local / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` on a model directory, a tokenizer-only directory (tokenizer
    files, no config.json) or a hub name. A tokenizer with code of its own (``auto_map`` in
    ``tokenizer_config.json``) loads only with ``trust_remote_code`` (the user's consent); a damaged
    tokenizer file is an error naming it."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    local = Path(path).expanduser()
    if not has_tokenizer(path):
        check_local(path)
    if local.is_dir():
        for f in TOKENIZER_JSON:
            if (local / f).is_file():
                read_json(local / f)
        check_remote_code(path, trust_remote_code, ("tokenizer_config.json",))
    try:
        with _clear_errors(path):
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers' parse errors are bare Exceptions
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: its tokenizer files could not be read ({first}); restore them (download or "
                         "export the model again)") from e


def check_finite(named, what: str, fix: str) -> None:
    """Refuse the first of ``named`` (``(name, tensor)`` pairs; meta tensors skipped) holding nan or inf:
    one pruned or sparsified from it would be garbage that still exits 0."""
    for name, t in named:
        if t.device.type != "meta":
            flat = t.detach().reshape(-1)
            parts = flat.split(1 << 24)  # 16M values at a time: the masks of a 1 GB embedding would take 1 GB
            if not all(bool(torch.isfinite(p).all()) for p in parts):
                bad = sum(int((~torch.isfinite(p)).sum()) for p in parts)
                raise FloatingPointError(f"{what} {name}: {bad:,} of {t.numel():,} values are not "
                                         f"finite (nan/inf); {fix}")


def check_weights_finite(model, path: str, prefix: str = "") -> None:
    """Every parameter of a loaded model is finite (once, after loading, before pruning or training).
    ``prefix``: the module path of ``model`` when it is one block of a streamed model."""
    check_finite(((prefix + n, p) for n, p in model.named_parameters()), f"{path}: weight", "the checkpoint is "
                 "damaged; restore it (download or export it again) or fix that tensor")


def load_pretrained(path: str, dtype: str = "fp32", trust_remote_code: bool = False, tokenizer: str | None = None,
                    device_map: str | dict | None = None, finite: bool = False):
    """``(model, tokenizer)`` of a model directory, hub name or reference name: :func:`load_model` and
    :func:`load_tokenizer` (from ``tokenizer`` when given) under one consent to run shipped code.
    ``finite``: refuse a weight holding nan/inf (prune, sparsify and run; eval reports the perplexity)."""
    model = load_model(path, dtype, trust_remote_code=trust_remote_code, device_map=device_map)
    if finite:
        check_weights_finite(model, path)
    tok = load_tokenizer(tokenizer or path, trust_remote_code)
    check_vocab(model, tok, path, tokenizer)
    return model, tok


def check_vocab(model, tokenizer, path: str, tokenizer_path: str | None = None) -> None:
    """The tokenizer's ids must index the model's embedding (more tokens than rows: an IndexError mid-run).
    Fewer is fine: embeddings are often padded to a multiple of 64."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if rows is None or len(tokenizer) <= rows:
        return
    if tokenizer_path:
        raise ValueError(f"{tokenizer_path}: the tokenizer has {len(tokenizer):,} tokens but the model {path} embeds "
                         f"{rows:,}; give the model's own tokenizer (model.tokenizer)")
    raise ValueError(f"{path}: its tokenizer has {len(tokenizer):,} tokens but its model embeds {rows:,}; the "
                     "tokenizer files are not this model's: put the model's own tokenizer beside it")


def _vocab_rows(model) -> int | None:
    head = model.get_output_embeddings()
    return None if head is None else head.weight.shape[0]


def load_teacher(path: str, dtype: str, trust_remote_code: bool, student):
    """The KD teacher at ``path``: finite weights, and the student's vocabulary (KD compares the two
    next-token distributions id by id; a teacher of another tokenizer would be an error mid-run)."""
    teacher = load_model(path, dtype, trust_remote_code=trust_remote_code)
    check_weights_finite(teacher, path)
    t, s = _vocab_rows(teacher), _vocab_rows(student)
    if t is not None and s is not None and t != s:
        raise ValueError(f"distill.teacher {path}: its vocabulary has {t:,} entries but the model's has {s:,}; "
                         "KD needs a teacher with the model's tokenizer")
    return teacher


def meta_model(path: str | Path, trust_remote_code: bool = False):
    """Build the model of a directory holding (at least) ``config.json`` on the meta device.

    A directory with its own modeling code (``auto_map``) is built only with ``trust_remote_code``
    (the user's consent); otherwise that is an error naming the directory.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json")
    check_remote_code(str(path), trust_remote_code)
    remote = trust_remote_code
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=remote)
        except ValueError:  # encoders (BERT) have no causal-LM class
            return AutoModel.from_config(cfg, trust_remote_code=remote)


def weight_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, file) from the headers of ``path``'s safetensors files (8 bytes of header
    length + the JSON header; no tensor data read). Unreadable headers are skipped (analyze needs no weights)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (ValueError, OSError, MemoryError):
            log.warning("%s: header not readable; config.json not checked against it", f)
            continue
        out.update({k: (tuple(v["shape"]), f.name) for k, v in header.items() if k != "__metadata__"})
    return out


def _layer_count(names) -> int:
    return len({m.group(1) for n in names if (m := re.search(r"\.(\d+)\.", n))})


def check_config_sizes(path: Path, model) -> None:
    """Warn when config.json lacks size keys (transformers' defaults are assumed); refuse a config whose
    shapes disagree with the safetensors beside it, naming the tensor and the keys to set."""
    missing = missing_size_keys(path, model.config)
    fix = (f"config.json has no {', '.join(missing)}, so transformers' defaults were assumed; set them"
           if missing else "config.json does not describe these weights; fix it")
    shapes = weight_shapes(path)
    ours = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    common = [n for n in shapes if n in ours]
    for n in common:
        if shapes[n][0] != ours[n]:
            raise ValueError(f"{path / 'config.json'} disagrees with {shapes[n][1]}: {n} is {list(shapes[n][0])} "
                             f"there but {list(ours[n])} by the config; {fix}")
    if common and _layer_count(common) != _layer_count(ours):
        raise ValueError(f"{path / 'config.json'} gives {_layer_count(ours)} layers but the weights hold "
                         f"{_layer_count(common)}; {fix}")
    if missing:
        used = ", ".join(f"{k}={getattr(model.config, k)}" for k in missing)
        log.warning("%s has no %s: transformers' defaults are assumed (%s); the sizes reported are those "
                    "defaults', not necessarily the model's", path / "config.json", ", ".join(missing), used)


def warn_if_too_big(path: str, command: str, stream: str) -> None:
    """A checkpoint whose fp32 copy (what the in-memory path holds on CPU) would not fit in 80% of the memory
    available: say so before loading it, naming the flags (``stream``) that hold one block at a time."""
    from shear.memory import available_bytes

    size, avail = source_weight_bytes(path), available_bytes()
    if size and avail:
        fp32 = size * (2 if checkpoint_dtype(path) in ("bf16", "fp16") else 1)
        if fp32 > 0.8 * avail:
            log.warning("%s: %s needs about %.1f GiB in fp32 and %.1f GiB are available; %s holds one block at a "
                        "time", command, path, fp32 / 2**30, avail / 2**30, stream)
