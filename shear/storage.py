"""How exported weights are stored: the dtype names ``--dtype`` takes and the shard size (torch-free,
so the command line can name them without importing torch)."""
from __future__ import annotations

#: dtypes of written weights; ``auto`` is the checkpoint's own (``shear.models.export_dtype``)
EXPORT_DTYPES = ("auto", "fp32", "bf16", "fp16")
#: the shard size of exports: huggingface_hub's default (``split_torch_state_dict_into_shards``), what hub
#: checkpoints use; transformers 5's ``save_pretrained`` defaults to 50GB, one file in practice
MAX_SHARD_SIZE = "5GB"


def shard_size(value: str | int) -> str | int:
    """A ``max_shard_size``: bytes (``1000000``) or a number with a unit (``5GB``, ``500MB``, ``2GiB``), as
    ``save_pretrained`` takes it; anything else is a ``ValueError``."""
    value = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    try:
        if _to_bytes(value) <= 0:
            raise ValueError
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"max shard size {value!r}: expected bytes or a number with a unit (5GB, 500MB, 2GiB)") from None
    return value


def _to_bytes(value: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(value)
