"""CPU latency at batch 1: prefill tokens/s and decode tokens/s (median of timed repeats).

- Prefill: one forward pass over a prompt of ``prefill_tokens`` tokens; rate = prefill_tokens / time.
- Decode: greedy ``generate`` with the KV cache from a ``prefill_tokens`` prompt, once with 1 new
  token and once with ``decode_tokens`` new tokens (``min_new_tokens`` forces the length); rate =
  (decode_tokens - 1) / (t_decode - t_1). The difference removes the prompt's prefill and the
  fixed cost of ``generate`` from the decode rate.
Prompts are seeded random token ids: speed does not depend on the text.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _median_time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompt(model, n: int, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g).to(next(model.parameters()).device)


@torch.inference_mode()
def measure_speed(model, prefill_tokens: int = 128, decode_tokens: int = 32, repeats: int = 5, warmup: int = 1,
                  num_threads: int | None = None) -> dict:
    """``{"prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "threads", ...}`` at batch 1."""
    if decode_tokens < 2:
        raise ValueError("decode_tokens: must be at least 2 (the rate is a difference of two lengths)")
    was_training = model.training
    model.eval()
    ids = _prompt(model, prefill_tokens)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else 0
    if isinstance(pad, list):
        pad = pad[0]
    mask = torch.ones_like(ids)

    def gen(n):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=pad)

    try:
        with _threads(num_threads):
            t_pre = _median_time(lambda: model(input_ids=ids, use_cache=False), repeats, warmup)
            t_one = _median_time(gen(1), repeats, warmup)
            t_all = _median_time(gen(decode_tokens), repeats, warmup)
            threads = torch.get_num_threads()
    finally:
        model.train(was_training)
    t_dec = max(t_all - t_one, 1e-9)
    return {"prefill_tok_s": prefill_tokens / t_pre, "decode_tok_s": (decode_tokens - 1) / t_dec,
            "prefill_s": t_pre, "decode_s": t_dec, "prefill_tokens": prefill_tokens,
            "decode_tokens": decode_tokens, "repeats": repeats, "threads": threads}
