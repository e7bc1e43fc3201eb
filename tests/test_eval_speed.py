"""CPU latency protocol: batch-1 prefill and fixed-length greedy decode with the KV cache."""
import math

import torch

from shear.eval.speed import measure_speed


def test_speed_measures_fixed_lengths(tiny_llama):
    lengths, cache_flags = [], []
    gen = tiny_llama.generate

    def spy(**kw):
        out = gen(**kw)
        lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        cache_flags.append(kw["use_cache"])
        return out

    tiny_llama.generate = spy
    before = torch.get_num_threads()
    s = measure_speed(tiny_llama, prefill_tokens=16, decode_tokens=6, repeats=2, warmup=1, num_threads=1)
    assert torch.get_num_threads() == before and s["threads"] == 1
    assert sorted(set(lengths)) == [1, 6] and len(lengths) == 2 * (2 + 1)  # (repeats + warmup) per length
    assert all(cache_flags)
    for k in ("prefill_tok_s", "decode_tok_s"):
        assert s[k] > 0 and math.isfinite(s[k])
    assert s["prefill_tok_s"] == 16 / s["prefill_s"] and s["decode_tok_s"] == 5 / s["decode_s"]
    assert not tiny_llama.training
