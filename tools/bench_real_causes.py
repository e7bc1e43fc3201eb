"""What moves a structured plan on a real model: one setting at a time, in-process, SmolLM2-135M, no recovery.

    OMP_NUM_THREADS=2 python tools/bench_real_causes.py \\
        '{"calib": "shakespeare", "n": 32, "L": 128, "estimator": "flap", "allocation": "global"}' \\
        '{"n": 32, "L": 128, "estimator": "flap", "allocation": "global"}' \\
        '{"n": 32, "L": 128, "estimator": "flap", "allocation": "uniform"}' \\
        '{"n": 32, "L": 128, "estimator": "flap", "allocation": "uniform", "structures": ["mlp"]}' \\
        '{"n": 64, "L": 512, "estimator": "flap", "allocation": "uniform", "structures": ["mlp"]}' \\
        '{"n": 64, "L": 512, "estimator": "obs", "allocation": "uniform", "structures": ["mlp"]}'

Each argument is one row (JSON): ``calib`` (default ``english``), ``n`` x ``L`` calibration tokens, ``ratio``
(default 0.2), and any ``PruneConfig`` key (``allocation``, ``structures``, ``heads``) or ``ImportanceConfig``
key (``estimator``, ``bias_compensation``). The model is pruned in memory (``prune_to_target_`` on a copy;
the export path is what tools/bench_real.py measures) and scored at once on benchlib's texts with a shorter
protocol for a quick sweep: the first 16 windows of 256 tokens of ``docs`` and ``news``. One JSON line per row.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PRUNE_KEYS = {"allocation", "structures", "heads", "round_to", "protected_layers"}


def main(argv: list[str]) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shear.data.text import calibration_ids
    from shear.eval.perplexity import eval_text
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.transform import prune_to_target_

    d = str(benchlib.smollm2())
    tok = AutoTokenizer.from_pretrained(d)
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    texts = {t: benchlib.text(t) for t in benchlib.TEXTS}
    cache: dict = {}
    for spec in argv:
        kw = json.loads(spec)
        calib, n, length, ratio = kw.pop("calib", "english"), kw.pop("n", 128), kw.pop("L", 512), kw.pop("ratio", 0.2)
        pk = {k: kw.pop(k) for k in list(kw) if k in PRUNE_KEYS}
        pcfg = PruneConfig(target={"ratio": ratio}, **pk)
        icfg = ImportanceConfig(n_samples=n, seq_len=length, source=calib, **kw)
        if (calib, n, length) not in cache:
            cache[calib, n, length] = calibration_ids(tok, n, length, 0, source=calib)
        m, t0 = copy.deepcopy(base), time.time()
        prune_to_target_(m, pcfg, icfg, cache[calib, n, length])
        row = {"spec": json.loads(spec), "params": sum(p.numel() for p in m.parameters()), "s": round(time.time() - t0),
               "heads": sorted({blk.self_attn.q_proj.out_features // m.config.head_dim for blk in m.model.layers}),
               "mlp": sorted({blk.mlp.gate_proj.out_features for blk in m.model.layers})}
        for t, txt in texts.items():
            row[t] = round(eval_text(m, tok, txt, seq_len=256, max_windows=16, batch_size=8).ppl, 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
