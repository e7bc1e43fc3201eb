"""Scale check: peak memory of scoring a ~300M-parameter random Llama, as a ratio to the weights' size.

    OMP_NUM_THREADS=2 python tools/bench_memory.py --estimator flap
    OMP_NUM_THREADS=2 python tools/bench_memory.py --estimator taylor_vector

One estimator per process (RSS peaks do not mix). Ratio = (peak RSS while scoring - RSS before the
model was built) / fp32 weight bytes. Targets: <= 1.5x for activation criteria (streamed block by
block), <= 2.5x for gradient criteria (hooks free each gradient). LLM-Pruner needs ~6x.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--estimator", default="flap")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="glibc M_MMAP_THRESHOLD (bytes; 0 = leave as is): larger temporaries are mmapped and "
                         "returned to the OS when freed, so block-by-block streaming does not fragment the heap")
    ap.add_argument("--structures", nargs="+", default=["heads", "mlp", "hidden"])
    args = ap.parse_args(argv)

    if args.mmap_threshold:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD
    from transformers import LlamaConfig, LlamaForCausalLM

    from shear.analyze import analyze
    from shear.importance import score
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import PeakMemory, kinds_needed, rss_bytes

    rss0 = rss_bytes()
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                      max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.n_samples, args.seq_len))
    graph = analyze(model)
    kinds = kinds_needed(PruneConfig(target={"ratio": 0.3}, structures=args.structures))
    icfg = ImportanceConfig(estimator=args.estimator, batch_size=args.batch_size,
                            gradient_checkpointing=args.checkpointing, layer_estimator=None)
    rss_model = rss_bytes()
    t0 = time.time()
    with PeakMemory(0.005) as mem:
        scores, _ = score(model, graph, icfg, ids, kinds=kinds)
    res = dict(estimator=args.estimator, params=n, weights_mb=round(wbytes / 2**20, 1),
               rss_before_model_mb=round(rss0 / 2**20, 1), rss_with_model_mb=round(rss_model / 2**20, 1),
               peak_mb=round(mem.peak / 2**20, 1), ratio=round((mem.peak - rss0) / wbytes, 3),
               seconds=round(time.time() - t0, 1), calibration=[args.n_samples, args.seq_len],
               batch_size=args.batch_size, checkpointing=args.checkpointing, structures=args.structures,
               threads=torch.get_num_threads(), mmap_threshold=args.mmap_threshold)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
