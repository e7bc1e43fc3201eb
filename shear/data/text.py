"""Text data: sources -> `datasets` -> tokens -> fixed-length blocks, plus a calibration sampler.

Sources (``DataConfig.source``):
- ``"shakespeare"``: the embedded corpus with its fixed held-out split (see ``corpus.py``);
- a local ``.txt`` / ``.jsonl`` / ``.json`` file, a directory of them, or a list of files;
- an HF dataset name (``load_dataset(name, config)``; offline it must be in the local cache).

Two formats. ``text``: documents are tokenized, joined with EOS and cut into blocks of ``seq_len``
(packing, so no token is padding). ``instruction``: each jsonl record is rendered with
``prompt_template``; the loss is on the response only (labels are -100 on the prompt and padding).
Items of the resulting datasets are ``{"input_ids": LongTensor[L], "labels": LongTensor[L]}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

IGNORE_INDEX = -100


class DataConfig(BaseModel):
    """Where the text comes from and how it is cut."""

    model_config = ConfigDict(extra="forbid")

    source: str | list[str] = Field("shakespeare", description="'shakespeare' (embedded), local file/dir path(s), or an HF dataset name")
    config_name: str | None = Field(None, description="HF dataset configuration name (e.g. 'wikitext-2-raw-v1')")
    format: Literal["text", "instruction"] = Field("text", description="plain text (packed) or instruction jsonl (loss on responses only)")
    text_field: str = Field("text", description="column holding the text (format=text)")
    prompt_field: str = Field("prompt", description="column holding the prompt (format=instruction)")
    response_field: str = Field("response", description="column holding the response (format=instruction)")
    prompt_template: str = Field("### Instruction:\n{prompt}\n\n### Response:\n", description="template rendering a prompt; the response follows it")
    seq_len: int = Field(256, gt=0, description="tokens per block")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out when the source has no validation split")
    seed: int = Field(0, description="seed of the train/validation split and of the calibration sampler")
    max_train_blocks: int | None = Field(None, gt=0, description="cap on training blocks (None = all)")
    max_validation_blocks: int | None = Field(None, gt=0, description="cap on validation blocks (None = all)")

    @field_validator("source")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must name a dataset, a file or 'shakespeare'")
        return v


def load_text_splits(cfg: DataConfig):
    """A ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of raw records."""
    from datasets import Dataset, DatasetDict, load_dataset

    if cfg.source == "shakespeare":
        from shear.data.corpus import load_corpus

        return DatasetDict({s: Dataset.from_list([{cfg.text_field: d["text"], "work": d["work"]} for d in load_corpus(s)])
                            for s in ("train", "validation")})
    files = _local_files(cfg.source)
    if files is not None:
        kind = "json" if files[0].suffix in (".jsonl", ".json") else "text"
        kw = {"sample_by": "document"} if kind == "text" else {}
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train", **kw)
    else:
        ds = load_dataset(cfg.source, cfg.config_name)
        if "validation" in ds and "train" in ds:
            return DatasetDict(train=ds["train"], validation=ds["validation"])
        ds = ds["train"]
    if cfg.validation_fraction == 0 or len(ds) < 2:
        raise ValueError(f"data.source {cfg.source!r}: no validation split; set data.validation_fraction > 0 "
                         "and give at least 2 documents")
    split = ds.train_test_split(test_size=cfg.validation_fraction, seed=cfg.seed, shuffle=True)
    return DatasetDict(train=split["train"], validation=split["test"])


def _local_files(source) -> list[Path] | None:
    """Local files named by ``source``, or None when it is not a local path (then: a hub name)."""
    items = source if isinstance(source, list) else [source]
    paths = [Path(s).expanduser() for s in items]
    if not any(p.exists() or p.suffix in (".txt", ".jsonl", ".json") for p in paths):
        return None
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl", ".json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data.source: no such file or directory: {p}")
    if not files:
        raise FileNotFoundError(f"data.source: no .txt/.jsonl/.json files in {source}")
    if len({f.suffix in (".jsonl", ".json") for f in files}) > 1:
        raise ValueError("data.source: mixes text and json files; give one kind")
    return files


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined with EOS: LongTensor[T]."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for ids in enc:
        out.extend(ids)
        if eos is not None:
            out.append(eos)
    return torch.tensor(out, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks: LongTensor[N, seq_len] (the tail is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(f"data: only {stream.numel()} tokens, fewer than one block of seq_len={seq_len}")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return stream[: n * seq_len].view(n, seq_len)


class BlockDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``input_ids``/``labels`` tensors of shape [N, L]."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        self.input_ids = input_ids
        self.labels = input_ids if labels is None else labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def _instruction_blocks(records, tokenizer, cfg: DataConfig, max_blocks) -> BlockDataset:
    """One block per record: prompt tokens (labels -100), response tokens + EOS, right padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_rows, lab_rows = [], []
    for r in records:
        p = tokenizer(cfg.prompt_template.format(prompt=r[cfg.prompt_field]), add_special_tokens=False)["input_ids"]
        a = tokenizer(r[cfg.response_field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[: cfg.seq_len]
        lab = ([IGNORE_INDEX] * len(p) + a)[: cfg.seq_len]
        n_pad = cfg.seq_len - len(ids)
        ids_rows.append(ids + [pad] * n_pad)
        lab_rows.append(lab + [IGNORE_INDEX] * n_pad)
        if max_blocks and len(ids_rows) >= max_blocks:
            break
    return BlockDataset(torch.tensor(ids_rows), torch.tensor(lab_rows))


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[BlockDataset, BlockDataset]:
    """(train, validation) block datasets for the trainer."""
    splits = load_text_splits(cfg)
    out = []
    for name, cap in (("train", cfg.max_train_blocks), ("validation", cfg.max_validation_blocks)):
        ds = splits[name]
        if cfg.format == "instruction":
            missing = {cfg.prompt_field, cfg.response_field} - set(ds.column_names)
            if missing:
                raise ValueError(f"data: instruction records lack field(s) {sorted(missing)}; have {ds.column_names}")
            out.append(_instruction_blocks(ds, tokenizer, cfg, cap))
        else:
            if cfg.text_field not in ds.column_names:
                raise ValueError(f"data.text_field: no column {cfg.text_field!r}; have {ds.column_names}")
            out.append(BlockDataset(pack(token_stream(ds[cfg.text_field], tokenizer), cfg.seq_len, cap)))
    return out[0], out[1]


def calibration_ids(tokenizer, n_samples: int = 32, seq_len: int = 128, seed: int = 0,
                    source: str = "shakespeare", split: str = "train") -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from one split: LongTensor[n, L], seeded."""
    cfg = DataConfig(source=source, seq_len=seq_len, seed=seed)
    texts = load_text_splits(cfg)[split][cfg.text_field]
    stream = token_stream(texts, tokenizer)
    if stream.numel() <= seq_len:
        raise ValueError(f"calibration: {stream.numel()} tokens, need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])
