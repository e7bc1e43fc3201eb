"""Vocabulary trimming: drop token-embedding rows that a target text never uses, and the tokenizer with them.

    from shear.prune.vocab import VocabConfig, token_counts, select_vocab, trim_vocab_
    keep = select_vocab(tok, token_counts(tok, texts), VocabConfig(min_count=1))
    tok = trim_vocab_(model, tok, keep)          # model sliced in place; returns the matching tokenizer
    export(model, out, tokenizer=tok)            # AutoTokenizer + AutoModel reproduce it in a fresh process

Why: in a small encoder the token table is most of the parameters (all-MiniLM-L6-v2: 11.7M of 22.7M), and
rows for ``[unusedN]`` or for scripts a deployment never sees cost memory, not compute.

Tokenizer contract (WordPiece only, e.g. BERT; other tokenizer models are refused). The kept tokens keep
their relative order and are renumbered 0..n-1; the model's rows follow the same order. WordPiece segments
each word by greedy longest match over the vocabulary, so:

* text whose original tokenization uses only kept tokens is tokenized to the same tokens (a longer match in
  the kept vocabulary would have been a longer match in the full one), and the model gives the same
  hidden states as before trimming;
* a word that used a removed token is re-segmented into kept pieces (``raining`` -> ``rain ##ing``), and
  a word with a character that no kept piece covers becomes ``[UNK]``; never the id of another token.

``VocabConfig.keep_ascii`` keeps every printable ASCII character and its ``##`` form, so English words
always re-segment instead of collapsing to ``[UNK]``.
"""
from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class VocabConfig:
    """Which tokens stay.

    min_count: a token stays when the text uses it at least this often.
    max_size: at most this many tokens stay (the most frequent; special and ASCII tokens always stay).
    keep_ascii: keep every printable ASCII character and its ``##`` continuation (see module docstring).
    """

    min_count: int = 1
    max_size: int | None = None
    keep_ascii: bool = True

    def __post_init__(self):
        if self.min_count < 1:
            raise ValueError(f"vocab.min_count: must be >= 1, got {self.min_count}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"vocab.max_size: must be >= 1, got {self.max_size}")


def _wordpiece_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"vocab trimming needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"vocab trimming supports WordPiece tokenizers (BERT-style) only; this one is "
                         f"{spec['model']['type']} (its merges would refer to removed tokens)")
    return spec


def token_counts(tokenizer, texts: list[str], batch: int = 256) -> torch.Tensor:
    """How often each token id occurs when ``texts`` are tokenized (special tokens included): LongTensor[V]."""
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    for i in range(0, len(texts), batch):
        for ids in tokenizer(texts[i:i + batch], add_special_tokens=True, verbose=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(counts))
    return counts


def select_vocab(tokenizer, counts: torch.Tensor, cfg: VocabConfig = VocabConfig()) -> torch.Tensor:
    """The token ids that stay, ascending: LongTensor[n]. ``counts``: LongTensor[V] from :func:`token_counts`."""
    vocab = _wordpiece_spec(tokenizer)["model"]["vocab"]
    forced = set(tokenizer.all_special_ids)
    if cfg.keep_ascii:
        for c in string.ascii_letters + string.digits + string.punctuation:
            forced |= {vocab[t] for t in (c, "##" + c) if t in vocab}
    order = torch.argsort(counts, descending=True, stable=True)
    seen = [i for i in order.tolist() if counts[i] >= cfg.min_count and i not in forced]
    if cfg.max_size is not None:
        seen = seen[:max(0, cfg.max_size - len(forced))]
    return torch.tensor(sorted(forced | set(seen)), dtype=torch.long)


def _swap_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Point every module that holds ``old`` (tied weights included) at ``new``."""
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is old:
                m._parameters[name] = new


def _trim_model_(model: nn.Module, keep: torch.Tensor) -> None:
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    old_w = emb.weight
    if int(keep.max()) >= old_w.shape[0]:
        raise ValueError(f"vocab trimming: token id {int(keep.max())} has no embedding row ({old_w.shape[0]} rows)")
    new_w = nn.Parameter(old_w.data[keep].clone(), requires_grad=old_w.requires_grad)
    out_w = out.weight if out is not None else None
    _swap_parameter(model, old_w, new_w)
    emb.num_embeddings = len(keep)
    new_index = {int(o): i for i, o in enumerate(keep.tolist())}
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_index[emb.padding_idx]
    if out is not None:
        if out_w is not old_w:  # untied head: slice its own rows
            _swap_parameter(model, out_w, nn.Parameter(out_w.data[keep].clone(), requires_grad=out_w.requires_grad))
        if getattr(out, "bias", None) is not None:
            b = out.bias
            _swap_parameter(model, b, nn.Parameter(b.data[keep].clone(), requires_grad=b.requires_grad))
        out.out_features = len(keep)
    cfg = model.config
    cfg.vocab_size = len(keep)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id"):
        old = getattr(cfg, key, None)
        if isinstance(old, int):
            if old not in new_index:
                raise ValueError(f"vocab trimming: config.{key}={old} is not among the kept tokens")
            setattr(cfg, key, new_index[old])


def _remap_post_processor(pp: dict | None, new_index: dict[int, int]) -> None:
    if pp is None:
        return
    kind = pp.get("type")
    if kind == "TemplateProcessing":
        for tok in pp["special_tokens"].values():
            tok["ids"] = [new_index[i] for i in tok["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            pp[key] = [pp[key][0], new_index[pp[key][1]]]
    elif kind == "Sequence":
        for p in pp["processors"]:
            _remap_post_processor(p, new_index)
    elif kind != "ByteLevel":
        raise ValueError(f"vocab trimming: post-processor {kind!r} is not supported")


def _trim_tokenizer(tokenizer, keep: torch.Tensor):
    spec = _wordpiece_spec(tokenizer)
    new_index = {int(o): i for i, o in enumerate(keep.tolist())}
    spec["model"]["vocab"] = {t: new_index[i] for t, i in spec["model"]["vocab"].items() if i in new_index}
    spec["added_tokens"] = [dict(a, id=new_index[a["id"]]) for a in spec["added_tokens"] if a["id"] in new_index]
    _remap_post_processor(spec.get("post_processor"), new_index)
    if spec.get("padding") and spec["padding"].get("pad_id") is not None:
        spec["padding"]["pad_id"] = new_index[spec["padding"]["pad_id"]]
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        (Path(d) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        vocab_txt = Path(d) / "vocab.txt"
        if vocab_txt.exists():  # a slow-tokenizer vocabulary beside it must agree line by line
            inv = {i: t for t, i in spec["model"]["vocab"].items()}
            vocab_txt.write_text("".join(inv[i] + "\n" for i in range(len(keep))))
        new = type(tokenizer).from_pretrained(d)
    if len(new) != len(keep):
        raise ValueError(f"vocab trimming: the rebuilt tokenizer has {len(new)} tokens, expected {len(keep)}")
    return new


def trim_vocab_(model: nn.Module, tokenizer, keep: torch.Tensor):
    """Keep only the token ids in ``keep`` (LongTensor[n]) in the model's embedding rows (and a tied or untied
    output head with its bias), renumbered in ascending order; returns the tokenizer that produces the new ids.

    The model is changed in place: ``config.vocab_size`` and the special-token ids in its config follow."""
    keep = torch.unique(keep.long())  # sorted, no duplicates
    missing = sorted(set(tokenizer.all_special_ids) - set(keep.tolist()))
    if missing:
        raise ValueError(f"vocab trimming: special token ids {missing} must be kept")
    new_tok = _trim_tokenizer(tokenizer, keep)
    _trim_model_(model, keep)
    return new_tok
