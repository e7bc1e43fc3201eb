"""Text data: sources -> `datasets` -> tokens -> fixed-length blocks, plus a calibration sampler.

Sources (``DataConfig.source``):
- ``"shakespeare"``: the embedded corpus with its fixed held-out split (see ``corpus.py``);
- ``"english"``: general English documentation prose, the Python standard library's docstrings
  (``english.py``; no download), the default calibration text of pretrained models;
- a local ``.txt`` / ``.jsonl`` / ``.json`` file, a directory of them, or a list of files;
  each .txt file is one document, except a single one, which is cut into documents (``split_documents``);
- an HF dataset name (``load_dataset(name, config)``; offline it must be in the local cache).

Two formats. ``text``: documents are tokenized, joined with EOS and cut into blocks of ``seq_len``
(packing, so no token is padding). ``instruction``: each jsonl record is rendered with
``prompt_template``; the loss is on the response only (labels are -100 on the prompt and padding).
Items of the resulting datasets are ``{"input_ids": LongTensor[L], "labels": LongTensor[L]}``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


IGNORE_INDEX = -100
DOC_CHARS = 20_000  # a single .txt file is cut into documents of at most about this many characters ...
MIN_DOCS = 20  # ... and into at least this many, so a validation share can be held out


class DomainConfig(BaseModel):
    """One named domain: a data source (as ``data.source``) and an optional reference loss."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="domain name used in logs, weights and plots")
    source: str | list[str] = Field(description="local file/dir path(s), an HF dataset name, or 'genre:<name>' "
                                                "for one genre of the shipped corpus")
    config_name: str | None = Field(None, description="HF dataset configuration name")
    text_field: str = Field("text", description="column holding the text")
    ref_loss: float | None = Field(None, description="reference loss (nats/token); None = measured from the teacher")
    weight: float = Field(1.0, gt=0, description="initial weight (normalized over domains)")


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
    seq_len: int = Field(256, description="tokens per block (at least 2: a 1-token block predicts nothing)")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out when the source has no validation split")
    seed: int = Field(0, description="seed of the train/validation split and of the calibration sampler")
    max_train_blocks: int | None = Field(None, gt=0, description="cap on training blocks (None = all)")
    max_validation_blocks: int | None = Field(None, gt=0, description="cap on validation blocks (None = all)")
    domains: list[DomainConfig] | Literal["genres"] | None = Field(
        None, description="dynamic batch loading (shear/data/domains.py): named training domains, or 'genres' for "
                          "the shipped corpus by genre; the training batches then come from these, validation from source")
    domain_eta: float = Field(1.0, gt=0, description="step size of the domain-weight update after each evaluation")
    domain_clamp_gap: bool = Field(False, description="use max(loss - ref, 0) as the gap (Sheared-LLaMA Alg. 1)")
    domain_min_weight: float | None = Field(None, ge=0.0, description="floor of every domain weight after each update: "
                                            "w <- (1 - K*m)*w + m over K domains (a mix with uniform, still summing to "
                                            "1); None = LLM-Shearing's (1 - c)*w + c/K with c = 1e-4 (after DoReMi), i.e. "
                                            "m = 1e-4/K; 0 = no floor")
    domain_reference: Literal["given_else_teacher", "given", "teacher"] = Field(
        "given_else_teacher", description="where each domain's reference loss comes from: given_else_teacher = "
        "data.domains[*].ref_loss where set, else the teacher's held-out loss on the domain; given = every domain "
        "sets ref_loss (Sheared-LLaMA: the loss a model of the target size is predicted to reach, from a scaling "
        "law fit per domain on the source family's losses, not the teacher's); teacher = the teacher's loss on "
        "every domain (a ref_loss is then refused)")

    @field_validator("seq_len")
    @classmethod
    def _two_tokens(cls, v):
        if v < 2:
            raise ValueError("must be at least 2: a block of 1 token has no next token to predict "
                             "(its perplexity would be 1.0 trivially)")
        return v

    @field_validator("source")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must name a dataset, a file or 'shakespeare'")
        return v


BUILTIN_SOURCES = ("shakespeare", "english")  # named corpora whose validation split is a fixed evaluation split


def load_documents(cfg: DataConfig):
    """The raw records of ``cfg.source``: a ``DatasetDict`` (``train``/``validation``) when the source has
    its own validation split (the named corpora, an HF dataset that ships one), else a ``Dataset`` of
    every document in source order (files sorted by name; an HF dataset's ``train`` split)."""
    from datasets import Dataset, DatasetDict, load_dataset

    if cfg.source == "english":
        from shear.data.english import load_english

        return DatasetDict({s: Dataset.from_list([{cfg.text_field: d} for d in load_english(s)])
                            for s in ("train", "validation")})
    if cfg.source == "shakespeare":
        from shear.data.corpus import load_corpus

        return DatasetDict({s: Dataset.from_list([{cfg.text_field: d["text"], "work": d["work"]} for d in load_corpus(s)])
                            for s in ("train", "validation")})
    files = _local_files(cfg.source)
    if files is not None and files[0].suffix in (".jsonl", ".json"):
        return _nonempty(load_json_records(files) if any(f.stat().st_size for f in files) else [], files)
    if files is not None:  # .txt: one document per file; a single file is cut into documents
        texts = [read_utf8(f) for f in files]
        docs = split_documents(texts[0]) if len(texts) == 1 else texts
        return Dataset.from_dict({"text": _nonempty(docs, files)})
    ds = load_dataset(cfg.source, cfg.config_name)
    if "validation" in ds and "train" in ds:
        return DatasetDict(train=ds["train"], validation=ds["validation"])
    return ds["train"]


def load_text_splits(cfg: DataConfig):
    """A ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of raw records.

    A source without a validation split of its own gets one: ``cfg.validation_fraction`` of its
    documents, drawn with ``cfg.seed``."""
    from datasets import DatasetDict

    ds = load_documents(cfg)
    if isinstance(ds, DatasetDict):
        return ds
    if cfg.validation_fraction == 0 or len(ds) < 2:
        raise ValueError(f"data.source {cfg.source!r}: no validation split; set data.validation_fraction > 0 "
                         f"and give at least 2 documents (found {len(ds)})")
    split = ds.train_test_split(test_size=cfg.validation_fraction, seed=cfg.seed, shuffle=True)
    return DatasetDict(train=split["train"], validation=split["test"])


def _nonempty(docs, files: list[Path]):
    """``docs`` unless the local ``files`` hold no text (then no split or sample could be drawn from them)."""
    if len(docs) == 0 or (isinstance(docs, list) and not any(d.strip() for d in docs)):
        named = str(files[0]) if len(files) == 1 else f"{len(files)} files in {files[0].parent}"
        raise ValueError(f"{named}: no text (empty); give a file with text")
    return docs


def calibration_texts(cfg: DataConfig, split: str = "train", whole: bool = True) -> list[str]:
    """The documents to calibrate on from ``cfg.source``.

    Calibration is not evaluation: with ``whole`` and ``split="train"``, a source without a validation
    split of its own (local files, an HF dataset with only ``train``) gives every document, in source
    order, instead of the training share :func:`load_text_splits` would leave. A validation split the
    source itself defines (the named corpora 'shakespeare' / 'english', an HF dataset that ships one)
    is an evaluation split and stays out. ``whole=False`` (or another ``split``): that split of
    :func:`load_text_splits` only, for a data section whose held-out share is the run's own validation.
    """
    from datasets import DatasetDict

    ds = load_documents(cfg) if split == "train" and whole else load_text_splits(cfg)
    if isinstance(ds, DatasetDict):
        ds = ds[split]
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"data.text_field: no column {cfg.text_field!r}; have {ds.column_names}")
    return list(ds[cfg.text_field])


def calibration_scope(source, data: "DataConfig | None" = None) -> str:
    """Which documents :func:`calibration_ids` draws from, in words (for reports)."""
    if data is not None or source in BUILTIN_SOURCES:
        return "train split"
    if _local_files(source) is not None:
        return "all documents"
    return "all documents (the train split where the dataset ships a validation split)"


def read_utf8(path: Path) -> str:
    """The text of a file, or an error naming the file and the first byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it first, "
                         "e.g. iconv -t UTF-8") from None


def split_documents(text: str, min_docs: int = MIN_DOCS, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut one file's text into documents so that a validation share can be held out.

    Paragraphs (blank-line separated) are grouped, in order, into documents of about
    ``min(max_chars, len(text) // min_docs)`` characters, joined back with a blank line; a text
    without blank lines is cut into chunks of that size at whitespace. Documents are later joined
    with EOS, so large documents keep EOS rare.
    """
    size = max(1, min(max_chars, len(text) // min_docs))
    paras = [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paras) < 2:
        paras = _chunks(text, size)
    docs, cur, n = [], [], 0
    for para in paras:
        cur.append(para)
        n += len(para)
        if n >= size:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs if len(docs) >= 2 else paras


def _chunks(text: str, size: int) -> list[str]:
    """``text`` in pieces of about ``size`` characters, cut at the last whitespace when there is one."""
    out, i = [], 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            k = max(text.rfind(c, i + size // 2, j) for c in " \n\t")
            j = k + 1 if k > i else j
        if text[i:j].strip():
            out.append(text[i:j])
        i = j
    return out


def load_json_records(files: list[Path]):
    """A ``datasets.Dataset`` of the records of .jsonl/.json files; a malformed file is named with its line."""
    from datasets import load_dataset

    ds_log = logging.getLogger("datasets")
    level = ds_log.level
    ds_log.setLevel(logging.CRITICAL)  # its parse-error log would precede the one line below
    try:
        return load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception:  # noqa: BLE001 - find the file and line at fault; re-raise when none is
        for f in files:
            problem = _json_problem(Path(f))
            if problem:
                raise ValueError(problem) from None
        raise
    finally:
        ds_log.setLevel(level)


def _json_problem(path: Path) -> str | None:
    """What is wrong with a .jsonl/.json file (encoding, or the first line that is not JSON), else None."""
    text = read_utf8(path)
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError:
        pass  # not one JSON document: must be JSON Lines
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})"
    return None


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
                    source: str = "shakespeare", split: str = "train", data: "DataConfig | None" = None) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens: LongTensor[n, L], seeded.

    ``source`` (a calibration text of its own): every document of a local file/dir or of an HF dataset
    without a validation split; the train split of the named corpora and of datasets that ship a
    validation split (see :func:`calibration_texts`). ``data``: a whole data section (its source, text
    field, dataset config...) instead of ``source``; its validation split is the run's held-out text,
    so only the train split is drawn from."""
    cfg = (data.model_copy(update={"seq_len": seq_len, "seed": seed}) if data is not None
           else DataConfig(source=source, seq_len=seq_len, seed=seed))
    texts = calibration_texts(cfg, split, whole=data is None)
    stream = token_stream(texts, tokenizer)
    if stream.numel() <= seq_len:
        raise ValueError(f"calibration: {stream.numel()} tokens, need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])
