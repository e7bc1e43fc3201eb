"""Peak memory of ``shear sparsify`` on random bf16 Llama checkpoints: the whole model in memory vs
``--stream`` (one decoder block at a time from the shards).

    SHEAR_CACHE=~/.cache/shear OMP_NUM_THREADS=2 python tools/bench_scale.py --out runs/bench-scale \\
        --sizes 0.48b 1.3b [--methods wanda sparsegpt] [--n-samples 16 --seq-len 128]

Each size is a Llama config (layers x hidden x MLP, 4 KV heads of 64 or 128) with random weights,
written once in bf16 with 1 GB shards into OUT/models/NAME and SmolLM2-135M's tokenizer beside it
(vocabulary 49,152; ``benchlib.smollm2()``). Each row is one ``shear sparsify`` command line in a fresh
process through ``benchlib.measure`` (wall seconds and that process's peak RSS, VmHWM), 50% unstructured,
calibration ``english`` of ``--n-samples`` x ``--seq-len`` tokens, dense form only (``--no-compressed``:
the streamed path writes no compressed form). The streamed export is checked to hold the same tensors
as the in-memory one (``torch.equal`` on every tensor). Writes OUT/results.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name -> (layers, hidden, intermediate, heads, kv heads)
SIZES = {
    "0.1b": (8, 768, 2048, 12, 4),
    "0.48b": (24, 1024, 4096, 16, 4),
    "1.3b": (22, 2048, 5632, 16, 4),
    "3b": (28, 3072, 8192, 24, 8),
}


def make_checkpoint(name: str, out: Path) -> Path:
    """A random bf16 Llama of size ``name`` with SmolLM2's tokenizer, written once."""
    d = out / "models" / name
    if (d / "config.json").exists():
        return d
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads, kv = SIZES[name]
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    src = benchlib.smollm2()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, tmp / f)
    tmp.rename(d)
    return d


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return False
    for k in ta:
        with safe_open(str(ta[k]), "pt") as ha, safe_open(str(tb[k]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    ap.add_argument("--sizes", nargs="+", default=["0.48b"], choices=sorted(SIZES))
    ap.add_argument("--methods", nargs="+", default=["wanda"], choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in a.sizes:
        ckpt = make_checkpoint(size, a.out)
        disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        for method in a.methods:
            dirs = {}
            for mode in ("in memory", "streamed"):
                d = a.out / "runs" / f"{size}-{method}-{mode.split()[0]}"
                cmd = ["shear", "sparsify", str(ckpt), "--method", method, "--sparsity", "0.5", "--no-compressed",
                       "--overwrite", "-o", str(d)]
                if method != "magnitude":
                    cmd += ["--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len)]
                if mode == "streamed":
                    cmd.append("--stream")
                m = benchlib.measure(cmd, log=a.out / "logs" / f"{size}-{method}-{mode.split()[0]}", threads=a.threads)
                dirs[mode] = d / "model"
                rows.append({"size": size, "shape": "x".join(map(str, SIZES[size][:3])), "gb_on_disk": round(disk / 1e9, 2),
                             "method": method, "mode": mode, "rc": m["rc"], "wall_s": m["wall_s"],
                             "peak_rss_gib": round(m["peak_rss_mb"] / 1024, 2) if m.get("peak_rss_mb") else None})
                print(json.dumps(rows[-1]), flush=True)
            if all(r["rc"] == 0 for r in rows[-2:]):
                rows[-1]["same_as_in_memory"] = same_tensors(dirs["in memory"], dirs["streamed"])
    cols = [("size", "model"), ("shape", "layers x hidden x MLP"), ("gb_on_disk", "GB on disk (bf16)"),
            ("method", "method"), ("mode", "mode"), ("wall_s", "wall s"), ("peak_rss_gib", "peak RSS GiB"),
            ("same_as_in_memory", "same tensors as in memory"), ("rc", "exit")]
    head = (f"Command: `OMP_NUM_THREADS={a.threads} python tools/bench_scale.py {' '.join(sys.argv[1:])}`\n"
            f"Machine: {benchlib.machine()['cpu']}, {benchlib.machine()['cores']} cores; each row ran with "
            f"{a.threads} thread(s), other jobs sharing the cores: times are pessimistic, memory is not\n\n")
    md = head + benchlib.table(rows, cols) + "\n"
    (a.out / "table.md").write_text(md)
    (a.out / "results.json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
