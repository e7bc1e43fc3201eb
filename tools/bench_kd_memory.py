"""Peak memory of the KD loss (CE + forward KL, forward + backward): chunked vs naive full logits.

    python tools/bench_kd_memory.py --tokens 2048 --hidden 512 --vocab 32000 --chunk 256

Each variant runs in a fresh subprocess; on CPU the number is the growth of peak RSS over the
process's state right before the loss (inputs and lm_head weights already allocated); on CUDA it
is torch.cuda.max_memory_allocated over the same span. Children run with
MALLOC_MMAP_THRESHOLD_=131072 so freed large blocks leave RSS at once (glibc would keep them).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def _peak_mb(device) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return benchlib.proc_mb("VmHWM")


def run_one(mode: str, a) -> dict:
    import torch

    from shear.train.losses import chunked_logit_losses, plain_logit_losses

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    head_s = torch.nn.Linear(a.hidden, a.vocab, bias=False, device=dev)
    head_t = torch.nn.Linear(a.hidden, a.vocab, bias=False, device=dev).requires_grad_(False)
    h_s = torch.randn(a.tokens, a.hidden, device=dev, requires_grad=True)
    h_t = torch.randn(a.tokens, a.hidden, device=dev)
    tgt = torch.randint(0, a.vocab, (a.tokens,), device=dev)
    # touch the allocator once so the baseline includes its warm-up
    (head_s(h_s[:1]).sum()).backward()
    h_s.grad = None
    head_s.weight.grad = None
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak_mb(dev) if dev == "cuda" else benchlib.proc_mb("VmRSS")
    if mode == "naive":
        s_logits = head_s(h_s)
        with torch.no_grad():
            t_logits = head_t(h_t)
        ce, kd = plain_logit_losses(s_logits, t_logits, tgt)
    else:
        ce, kd = chunked_logit_losses(h_s, head_s, h_t, head_t, tgt, chunk_size=a.chunk)
    (ce + kd).backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    peak = _peak_mb(dev)
    return {"mode": mode, "device": dev, "loss": float(ce + kd), "peak_mb_over_baseline": round(peak - before, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a)))
        return 0
    rows = []
    for mode in ("naive", "chunked"):
        argv = [__file__, "--child", mode, "--tokens", str(a.tokens), "--hidden", str(a.hidden), "--vocab", str(a.vocab),
                "--chunk", str(a.chunk)]
        rows.append(benchlib.fresh_json(argv, env={"MALLOC_MMAP_THRESHOLD_": "131072"}))  # big blocks mmap'd: RSS drops on free
    full = a.tokens * a.vocab * 4 / 2**20
    print(f"tokens={a.tokens} hidden={a.hidden} vocab={a.vocab} chunk={a.chunk} device={rows[0]['device']}; "
          f"one fp32 [tokens x vocab] tensor = {full:.0f} MiB")
    print(f"{'mode':8s} {'peak MiB over baseline':>24s} {'loss':>12s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['peak_mb_over_baseline']:24.1f} {r['loss']:12.4f}")
    print(f"ratio naive/chunked: {rows[0]['peak_mb_over_baseline'] / max(rows[1]['peak_mb_over_baseline'], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
