"""Peak memory and time of ``shear prune`` (FLAP) and ``shear sparsify`` (Wanda, SparseGPT) on random bf16
Llama checkpoints: the whole model in memory vs ``--stream`` (one decoder block at a time from the shards).

    SHEAR_CACHE=~/.cache/shear OMP_NUM_THREADS=2 python tools/bench_scale.py --out runs/bench-scale \
        --sizes 0.48b 1.3b 8b [--commands flap wanda sparsegpt] [--n-samples 8 --seq-len 128] [--cap-gib 12]

Each size is a Llama config (layers x hidden x MLP, heads / KV heads, vocabulary; ``8b`` is Llama-3-8B's shape:
32 x 4096 x 14336, 32/8 heads, vocabulary 128,256; ``8b-4l`` the same with 4 blocks, for the slow SparseGPT rows:
a streamed run's peak is one block, whatever the depth) with random weights (N(0, 0.02), norms 1), written once in
bf16 with 1 GB shards into OUT/models/NAME one tensor at a time (never the whole model in memory), SmolLM2-135M's
tokenizer beside it (``benchlib.smollm2()``; its 49,152 ids index any of these vocabularies). Each row is one
command line in a fresh process through ``benchlib.measure`` (wall seconds and that process's peak RSS, VmHWM):
``shear prune CKPT --estimator flap --ratio 0.3`` or ``shear sparsify CKPT --method M --sparsity 0.5
--no-compressed``, calibration ``english`` of ``--n-samples`` x ``--seq-len`` tokens, written in bf16. The
in-memory row is run only where the fp32 copy fits in 80% of the memory available (else the row says so);
where both ran, the streamed export is checked to hold the same tensors (``torch.equal`` on every tensor).
``--cap-gib N`` runs the streamed rows under a memory cap of N GiB (``benchlib.measure``'s cgroup limit, the page
cache of the shards it reads included; below the checkpoint's size it shows the model was never held). ``--reload``: every
streamed export is loaded by plain ``from_pretrained`` (bf16) in a fresh process, which reports missing /
unexpected keys and whether logits on 8 tokens are finite; ``--drop-exports`` deletes each export once measured
(an 8B row writes up to 16 GB). Writes OUT/results.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name -> (layers, hidden, intermediate, heads, kv heads, vocabulary)
SIZES = {
    "0.1b": (8, 768, 2048, 12, 4, 49152),
    "0.48b": (24, 1024, 4096, 16, 4, 49152),
    "1.3b": (22, 2048, 5632, 16, 4, 49152),
    "3b": (28, 3072, 8192, 24, 8, 49152),
    "8b": (32, 4096, 14336, 32, 8, 128256),
    "8b-4l": (4, 4096, 14336, 32, 8, 128256),  # Llama-3-8B's widths and vocabulary, 4 of its 32 blocks
}
COMMANDS = {
    "flap": ["prune", "--estimator", "flap", "--ratio", "0.3"],
    "wanda": ["sparsify", "--method", "wanda", "--sparsity", "0.5", "--no-compressed"],
    "sparsegpt": ["sparsify", "--method", "sparsegpt", "--sparsity", "0.5", "--no-compressed"],
    "magnitude": ["sparsify", "--method", "magnitude", "--sparsity", "0.5", "--no-compressed"],
}


def make_checkpoint(name: str, out: Path) -> Path:
    """A random bf16 Llama of size ``name`` with SmolLM2's tokenizer, written once, one tensor at a time."""
    d = out / "models" / name
    if (d / "config.json").exists():
        return d
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from shear.shards import ShardWriter

    layers, hidden, inter, heads, kv, vocab = SIZES[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, dtype="bfloat16")
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    specs = {n: (list(p.shape), torch.bfloat16) for n, p in model.state_dict().items()}
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = ShardWriter(tmp, specs, "1GB")
    gen = torch.Generator().manual_seed(0)
    for n, (shape, dtype) in specs.items():
        t = torch.ones(shape) if n.endswith("norm.weight") else torch.randn(shape, generator=gen).mul_(0.02)
        w.write(n, t.to(dtype))
        del t
    w.close()
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    src = benchlib.smollm2()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, tmp / f)
    tmp.rename(d)
    return d


RELOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, output_loading_info=True)
with torch.no_grad():
    out = m(input_ids=torch.arange(8)[None]).logits
bad = {k: v[:3] for k, v in info.items() if v}
print(json.dumps({"loading_info": bad, "finite": bool(torch.isfinite(out).all()),
                  "params": sum(p.numel() for p in m.parameters())}))
"""


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
    ap.add_argument("--sizes", nargs="+", default=["0.48b"], choices=list(SIZES))
    ap.add_argument("--commands", "--methods", nargs="+", default=["wanda"], choices=list(COMMANDS))
    ap.add_argument("--modes", nargs="+", default=["in memory", "streamed"], choices=["in memory", "streamed"])
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=None, help="memory cap of the streamed rows (a cgroup limit)")
    ap.add_argument("--reload", action="store_true", help="load every streamed export with from_pretrained")
    ap.add_argument("--drop-exports", action="store_true", help="delete each export once measured (disk space)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    from shear.memory import available_bytes

    rows = []
    for size in a.sizes:
        ckpt = make_checkpoint(size, a.out)
        disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        for command in a.commands:
            dirs = {}
            for mode in a.modes:
                tag = f"{size}-{command}-{mode.split()[0]}"
                d = a.out / "runs" / tag
                cmd = ["shear", COMMANDS[command][0], str(ckpt), *COMMANDS[command][1:], "--overwrite", "-o", str(d)]
                if command != "magnitude":
                    cmd += ["--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len)]
                row = {"size": size, "shape": "x".join(map(str, SIZES[size][:3])), "gb_on_disk": round(disk / 1e9, 2),
                       "command": command, "mode": mode}
                if mode == "streamed":
                    cmd.append("--stream")
                    row["cap_gib"] = a.cap_gib
                elif 2 * disk > 0.8 * available_bytes():
                    row["note"] = f"not run: the fp32 copy ({2 * disk / 2**30:.0f} GiB) does not fit in memory"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                cap = int(a.cap_gib * 2**30) if a.cap_gib and mode == "streamed" else None
                m = benchlib.measure(cmd, log=a.out / "logs" / tag, threads=a.threads, max_mem_bytes=cap)
                dirs[mode] = d / "model"
                row.update(rc=m["rc"], wall_s=m["wall_s"],
                           peak_rss_gib=round(m["peak_rss_mb"] / 1024, 2) if m.get("peak_rss_mb") else None)
                if m["rc"] == 0:
                    row["gb_written"] = round(sum(f.stat().st_size for f in (d / "model").glob("*.safetensors")) / 1e9, 2)
                if m["rc"] == 0 and mode == "streamed" and a.reload:
                    r = benchlib.fresh_json(["-c", RELOAD, str(d / "model")], threads=a.threads)
                    row["reload"] = "ok" if not r["loading_info"] and r["finite"] else json.dumps(r)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if len(dirs) == 2 and all(r.get("rc") == 0 for r in rows[-2:]):
                rows[-1]["same_as_in_memory"] = same_tensors(dirs["in memory"], dirs["streamed"])
            if a.drop_exports:
                for d in dirs.values():
                    shutil.rmtree(d, ignore_errors=True)
    cols = [("size", "model"), ("shape", "layers x hidden x MLP"), ("gb_on_disk", "GB on disk (bf16)"),
            ("command", "command"), ("mode", "mode"), ("cap_gib", "memory cap GiB"), ("wall_s", "wall s"),
            ("peak_rss_gib", "peak RSS GiB"), ("gb_written", "GB written"), ("same_as_in_memory", "same tensors as in memory"),
            ("reload", "from_pretrained"), ("rc", "exit"), ("note", "note")]
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
