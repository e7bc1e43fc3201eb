"""Perplexity over one long token stream with (optionally overlapping) sliding windows.

Protocol (the one of the HF "perplexity of fixed-length models" guide, made exact): windows of
``seq_len`` tokens start every ``stride`` tokens; a window that does not fit is dropped. The first
window scores its tokens 1..seq_len-1 (token 0 has no context); every later window scores only its
last ``stride`` tokens, so each scored token is predicted once, with at least ``seq_len - stride``
tokens of context. With ``stride == seq_len`` the windows do not overlap and each scores
``seq_len - 1`` tokens (WikiText protocol of Wanda/SparseGPT at 2048, LLM-Pruner/FLAP at 128).

PPL = exp(NLL / n), NLL = -sum log p(x_t | x_<t) over the n scored tokens: log-softmax in float32
(bf16 logits are upcast), the sum in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class PPLResult:
    """Perplexity, its summed NLL (nats), the number of scored tokens, and the protocol that made it."""

    ppl: float
    nll: float
    tokens: int
    protocol: dict = field(default_factory=dict)

    def protocol_line(self) -> str:
        """One human line naming everything that determines the number."""
        return protocol_line(self.protocol)


def protocol_line(protocol: dict) -> str:
    """``dataset=..., split=..., seq_len=..., stride=..., windows=..., tokens_scored=...``."""
    keys = ("dataset", "split", "seq_len", "stride", "windows", "tokens_scored")
    return ", ".join(f"{k}={protocol[k]}" for k in keys if k in protocol)


def window_plan(n_tokens: int, seq_len: int, stride: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """``[(start, first_scored_offset), ...]`` for the windows over a stream of ``n_tokens``.

    Window w covers tokens ``[start, start + seq_len)`` and scores the targets at offsets
    ``first_scored_offset .. seq_len - 1`` (offset 1 in the first window, ``max(1, seq_len - stride)``
    after: a window never scores its token 0, which has no context inside the window).
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride: must be in 1..seq_len={seq_len}, got {stride}")
    if n_tokens < seq_len:
        raise ValueError(f"perplexity: only {n_tokens} tokens, fewer than one window of seq_len={seq_len}")
    starts = range(0, n_tokens - seq_len + 1, stride)
    plan = [(s, 1 if i == 0 else max(1, seq_len - stride)) for i, s in enumerate(starts)]
    return plan[:max_windows] if max_windows else plan


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if _is_hf(model) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "generation_config")


def window_nll(logits: torch.Tensor, ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each window's scored targets.

    logits: [B, L, V]; ids: [B, L]; first: LongTensor[B] (first scored offset per window).
    Returns float64[B]: -sum_{t >= first} log softmax(logits[:, t-1])[ids[:, t]].
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, L-1, V] predicts ids[:, 1:]
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).double()  # [B, L-1]
    offs = torch.arange(1, ids.shape[1], device=ids.device)  # target offsets 1..L-1
    keep = offs[None, :] >= first[:, None]
    return -(tok * keep).sum(dim=1)


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, seq_len: int = 256, stride: int | None = None,
               batch_size: int = 4, max_windows: int | None = None, protocol: dict | None = None,
               progress: bool = False) -> PPLResult:
    """Perplexity of ``model`` on a stream ``token_ids``: LongTensor[N] (see the module docstring).

    ``model(input_ids)`` must return logits [B, L, V] (or an object with ``.logits``).
    ``protocol`` (e.g. dataset and split) is merged into the result's protocol dict.
    """
    stride = seq_len if stride is None else stride
    ids = token_ids.reshape(-1).long()
    plan = window_plan(ids.numel(), seq_len, stride, max_windows)
    param = next(model.parameters(), None)
    device = param.device if param is not None else ids.device
    nll, n = 0.0, 0
    batches = range(0, len(plan), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for b in batches:
        chunk = plan[b: b + batch_size]
        x = torch.stack([ids[s: s + seq_len] for s, _ in chunk]).to(device)
        first = torch.tensor([f for _, f in chunk], device=device)
        nll += window_nll(_logits(model, x), x, first).sum().item()
        n += sum(seq_len - f for _, f in chunk)
    proto = dict(protocol or {})
    proto.update(seq_len=seq_len, stride=stride, windows=len(plan), tokens_scored=n)
    mean = nll / n
    return PPLResult(ppl=math.exp(mean) if not mean > 700 else math.inf, nll=nll, tokens=n, protocol=proto)


def load_eval_text(dataset: str = "shakespeare", split: str = "validation", text_field: str = "text",
                   dataset_config: str | None = None) -> str:
    """The text of one split as one string, documents joined by a blank line (WikiText convention).

    ``dataset``: 'shakespeare' (embedded corpus), 'english' (shear/data/english.py), a local .txt file (read as is), a local
    .jsonl/.json file (``text_field`` of every record), a directory of such files (every document, as
    ``data.source`` reads it), or an HF dataset name.
    """
    from pathlib import Path

    from shear.data.text import DataConfig, load_documents, load_json_records, read_utf8

    if dataset == "shakespeare":
        from shear.data.corpus import load_corpus_text

        return load_corpus_text(split)
    if dataset == "english":  # the standard library's docstrings; validation = every 20th document
        from shear.data.english import load_english

        return "\n\n".join(load_english(split))
    path = Path(dataset).expanduser()
    if path.is_dir():
        if not any(f.suffix in (".txt", ".jsonl", ".json") for f in path.iterdir()):
            raise FileNotFoundError(f"eval.dataset: {path} is a directory without .txt/.jsonl/.json files; give a "
                                    "text file, a directory of them, 'shakespeare' or an HF dataset name")
        ds = load_documents(DataConfig(source=str(path)))
    elif path.suffix == ".txt" or (path.exists() and path.suffix not in (".jsonl", ".json")):
        if not path.is_file():
            raise FileNotFoundError(f"eval.dataset: no such file: {path}")
        return read_utf8(path)
    elif path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"eval.dataset: no such file: {path}")
        ds = load_json_records([path])
    else:
        from datasets import load_dataset

        ds = load_dataset(dataset, dataset_config, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"eval.text_field: no column {text_field!r}; have {ds.column_names}")
    return "\n\n".join(ds[text_field])


def eval_text(model, tokenizer, text: str, seq_len: int = 256, stride: int | None = None, batch_size: int = 4,
              max_windows: int | None = None, protocol: dict | None = None, progress: bool = False) -> PPLResult:
    """Tokenize ``text`` as one stream (no special tokens) and score it with :func:`perplexity`."""
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    return perplexity(model, ids, seq_len, stride, batch_size, max_windows, protocol, progress)
