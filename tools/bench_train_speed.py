"""Training throughput of the reference architectures, fp32 vs bf16 autocast, timed side by side.

    OMP_NUM_THREADS=1 python tools/bench_train_speed.py --archs reference-quick,mid,reference --rounds 3

One AdamW step = forward + backward + update on batch x seq_len random tokens, 1 torch thread. Each
round times every (architecture, precision) for --steps steps after one warm-up step, interleaved,
so a neighbour's load hits every cell alike; read ratios within a round. 'mid' is hidden 192,
4 layers, 6 query / 2 KV heads of 32, MLP 512 (2.4M parameters), a size between the two references.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

MID = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
           intermediate_size=512)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="reference-quick,mid,reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    from shear.models import reference_config

    torch.set_num_threads(1)
    models = {}
    for name in a.archs.split(","):
        torch.manual_seed(0)
        cfg = reference_config("reference-quick", **MID) if name == "mid" else reference_config(name)
        m = LlamaForCausalLM(cfg).train()
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3), sum(p.numel() for p in m.parameters()))
    x = torch.randint(0, 2048, (a.batch_size, a.seq_len))

    def step(m, opt, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    rates: dict = {}
    for _ in range(a.rounds):
        for name, (m, opt, _) in models.items():
            for bf16 in (False, True):
                step(m, opt, bf16)
                t = time.perf_counter()
                for _ in range(a.steps):
                    step(m, opt, bf16)
                rates.setdefault((name, bf16), []).append(a.steps * x.numel() / (time.perf_counter() - t))
    def per_round(vs, spec: str) -> str:
        return " / ".join(format(v, spec) for v in vs)

    cells = []
    for name, (_, _, n) in models.items():
        f, b = rates[(name, False)], rates[(name, True)]
        cells.append({"arch": name, "params": n, "fp32": per_round(f, ".0f"), "bf16": per_round(b, ".0f"),
                      "ratio": per_round([y / x for x, y in zip(f, b)], ".2f")})
    print(benchlib.table(cells, [("arch", "arch"), ("params", "params"), ("fp32", "fp32 tok/s (per round)"),
                                 ("bf16", "bf16 autocast tok/s"), ("ratio", "bf16 / fp32")], align="lr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
