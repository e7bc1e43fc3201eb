"""shear's magnitude / Wanda / SparseGPT vs llm-compressor's, same model, calibration and protocol, one run.

    OMP_NUM_THREADS=1 nice -n 5 python tools/bench_llmcompressor.py --model reference-teacher --layer 4096

llm-compressor pins an older transformers than shear, so it lives in its own virtualenv, made once by
this script (``--venv``, default ``~/.cache/shear/llmc-venv``): ``pip install torch==TORCH`` first (the
CPU wheel; a plain torch requirement pulls a multi-GB CUDA build), then ``llmcompressor==LLMC``.
Every run is its own process: shear's in this interpreter, llm-compressor's in that venv's (this same
file, ``--worker``, which imports neither shear nor anything outside that venv but ``tools/benchlib.py``, whose
import is the standard library's alone). Both read:

- the same model directory (fp32);
- the same calibration token ids, ``calib.pt`` in the output directory: ``--n-samples`` windows of
  ``--seq-len`` tokens of the shipped corpus's train split, seed 0 (``shear.data.text.calibration_ids``),
  in the same order and batches (``--batch-size``; llm-compressor gets them as a DataLoader, so its
  shuffling and collation do not apply);
- the same targets: every Linear inside the decoder blocks (llm-compressor: ``targets=["Linear"]``,
  ``ignore=["re:.*lm_head"]``), embeddings and LM head untouched;
- the same algorithm settings: SparseGPT dampening 0.01 of mean diag(H), blocks of 128 columns; both are
  layer-sequential (llm-compressor's ``sequential`` pipeline, ``propagate_error=True``: each decoder
  layer is calibrated on the pruned outputs of the one before, as shear does).

Magnitude: llm-compressor's ``MagnitudePruningModifier`` is a training-time modifier: it computes its
masks but applies them only on optimizer steps (or through forward hooks that ``oneshot`` does not turn
on), so run one-shot it returns the model with no zero (checked: sparsity 0.0). Its magnitude row here is
its own mask creator (``PruningMaskFactory``'s "unstructured": |W| over each weight matrix) applied to
every block linear by this script. It has no N:M magnitude mask (its ``block_*`` masks are contiguous
blocks), so magnitude 2:4 is shear-only.

Each run saves a dense model directory (``save_pretrained``); all of them, llm-compressor's included,
are then loaded here with ``from_pretrained`` and scored by one protocol: ``shear.eval.perplexity.eval_text``
on ``load_eval_text("shakespeare", "validation")``, windows of 128 tokens, non-overlapping, the first 200.
Each model's zeros are counted per target linear (2:4 checked to be exactly 2:4) and its other weights
compared with the dense model's.

Measured per run: ``wall_s`` (the whole process: imports, load, calibrate + prune, save), ``prune_s``
(the prune call alone: ``sparsify_`` / ``oneshot``), ``peak_mb`` (the process's own high-water RSS,
VmHWM from /proc/self/status, over load, prune and save: imports and all) and ``prune_peak_mb`` (VmHWM
over the prune call minus the RSS just before it, the high-water mark reset through
``/proc/self/clear_refs``). Not ``ru_maxrss`` from ``wait4`` / ``RUSAGE_CHILDREN``: Linux carries the
parent's high-water mark into the child at fork, so that measures this driver. Runs alternate shear /
llm-compressor point by point so a neighbour's load on the shared cores hits both alike.

The benchmark model is small (1.3M parameters), so whole-process memory is mostly the interpreter and
its libraries. ``--layer N`` adds the prune call alone on one ``N x N`` linear with a full-rank Hessian
(the same seeded weights and Hessian in both venvs; SparseGPT at 50% and 2:4, magnitude at 50%):
seconds and memory above the RSS before the call at a real model's layer size.

Writes ``results.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

TORCH = "2.13.0"
LLMC = "0.14.0.1"  # resolves transformers 5.17.0, compressed-tensors 0.19.0 beside torch 2.13.0+cpu
POINTS = ("0.5", "0.6", "0.7", "2:4")
METHODS = ("magnitude", "wanda", "sparsegpt")
DAMPENING, BLOCKSIZE = 0.01, 128


# ---------------------------------------------------------------- the other virtualenv

def ensure_venv(venv: Path) -> Path:
    """``venv/bin/python`` with torch==TORCH and llmcompressor==LLMC, made once (a marker file holds the pins)."""
    py, marker = venv / "bin" / "python", venv / "shear-bench.json"
    want = {"torch": TORCH, "llmcompressor": LLMC}
    if py.exists() and marker.exists() and json.loads(marker.read_text()).get("pins") == want:
        return py
    print(f"making {venv} (torch=={TORCH}, then llmcompressor=={LLMC}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={TORCH}"], check=True)  # first: the CPU wheel, before anything wants torch
    subprocess.run(pip + [f"llmcompressor=={LLMC}"], check=True)
    marker.write_text(json.dumps({"pins": want, "versions": venv_versions(py)}, indent=2))
    return py


def venv_versions(py: Path) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('torch', 'transformers', 'llmcompressor', 'compressed-tensors', 'accelerate')}))")
    return benchlib.fresh_json(["-c", code], python=str(py))


# ---------------------------------------------------------------- workers (one process per run)

class _PruneMemory:
    """RSS before the prune call and VmHWM after it, the high-water mark reset at the start."""

    def __enter__(self):
        import gc

        gc.collect()
        self.hwm_before = benchlib.proc_mb("VmHWM")  # the load's peak, before the reset
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.rss0 = benchlib.proc_mb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.hwm = benchlib.proc_mb("VmHWM")

    def record(self) -> dict:
        """Called after the save: ``peak_mb`` is the whole process's high-water RSS (load, prune, save)."""
        end = benchlib.proc_mb("VmHWM")
        return {"prune_s": round(self.seconds, 2), "rss_before_mb": round(self.rss0, 1),
                "prune_peak_mb": round(self.hwm - self.rss0, 1) if self.reset else None,
                "peak_mb": round(max(self.hwm_before, end), 1)}


def _batches(ids, batch_size: int):
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def worker_shear(spec: dict) -> dict:
    import torch

    from shear.models import load_model
    from shear.sparse import SparsifyConfig, sparsify_

    torch.set_num_threads(spec["threads"])
    ids = torch.load(spec["calib"])
    model = load_model(spec["model"])
    pt = spec["point"]
    cfg = SparsifyConfig(method=spec["method"], **({"pattern": pt} if ":" in pt else {"sparsity": float(pt)}),
                         n_samples=ids.shape[0], seq_len=ids.shape[1], batch_size=spec["batch_size"],
                         dampening=DAMPENING, blocksize=BLOCKSIZE)
    with _PruneMemory() as mem:
        sparsify_(model, cfg, ids)
    model.save_pretrained(spec["out"])
    return mem.record()


def worker_llmc(spec: dict) -> dict:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    ids = torch.load(spec["calib"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(spec["model"])  # oneshot refuses a dataset without a processor
    pt, method = spec["point"], spec["method"]
    if method == "magnitude":
        return _llmc_magnitude(model, float(pt), spec)
    mask = {"mask_structure": pt} if ":" in pt else {}
    sparsity = 0.5 if ":" in pt else float(pt)  # with an N:M structure the sparsity is N/M
    common = dict(targets=["Linear"], ignore=["re:.*lm_head"], **mask)
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        mod = WandaPruningModifier(sparsity=sparsity, **common)
    else:
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        mod = SparseGPTModifier(sparsity=sparsity, block_size=BLOCKSIZE, dampening_frac=DAMPENING, **common)
    data = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in _batches(ids, spec["batch_size"])]
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    with _PruneMemory() as mem:
        model = oneshot(model=model, processor=tok, recipe=[mod], dataset=loader, pipeline="sequential",
                        num_calibration_samples=ids.shape[0]) or model
    model.save_pretrained(spec["out"])
    return mem.record()


def _llmc_magnitude(model, sparsity: float, spec: dict) -> dict:
    """llm-compressor's magnitude mask ("unstructured" mask creator: |W| over each weight matrix, ties at the
    threshold pruned too) applied to every block linear. Its ``MagnitudePruningModifier`` computes that mask
    but applies it only on optimizer steps (or forward hooks that oneshot does not enable): run by
    ``oneshot`` (start=0, init = final sparsity, either pipeline) it returns the model with no zero at all."""
    import torch
    from llmcompressor.modifiers.pruning.utils.pytorch import PruningMaskCreatorArgs, PruningMaskFactory

    creator = PruningMaskFactory.create_mask_creator("unstructured")
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with _PruneMemory() as mem, torch.no_grad():
        for lin in layers:
            w = lin.weight
            w.mul_(creator(PruningMaskCreatorArgs(parameter=w, sparsity=sparsity, scores=w.abs())))
    model.save_pretrained(spec["out"])
    return mem.record()


def worker_layer(spec: dict) -> dict:
    """One ``n x n`` linear with a full-rank Hessian (seeded; the same in both venvs): the prune call's time
    and memory at a real model's layer size, which the small benchmark model cannot show."""
    import torch

    torch.set_num_threads(spec["threads"])
    n, pt, method = spec["n"], spec["point"], spec["method"]
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, n, generator=g))
        x = torch.randn(2 * n, n, generator=g)
        H = 2 * x.t() @ x / 16
        del x
    nm = tuple(map(int, pt.split(":"))) if ":" in pt else None
    sparsity = 0.5 if nm else float(pt)
    # import before measuring: llm-compressor's import alone is ~100 MB of RSS
    if spec["tool"] == "shear":
        from shear.sparse.masks import mask_for
        from shear.sparse.sparsegpt import sparsegpt_prune
    else:
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
        from llmcompressor.modifiers.pruning.utils.pytorch import PruningMaskCreatorArgs, PruningMaskFactory

        hessians = {lin: H}  # as in its pipeline, the dict holds the only reference: it factors H in place
        del H
    with _PruneMemory() as mem, torch.no_grad():
        if spec["tool"] == "shear":
            if method == "sparsegpt":
                new = sparsegpt_prune(lin.weight, H, None if nm else sparsity, nm, BLOCKSIZE, DAMPENING)[0]
            else:
                new = lin.weight.float() * mask_for("magnitude", lin.weight, sparsity)
        elif method == "sparsegpt":
            new = sparsify_weight(lin, hessians, sparsity, *((nm[1] - nm[0], nm[1]) if nm else (0, 0)),
                                  BLOCKSIZE, DAMPENING, False)[1]
        else:
            mask = PruningMaskFactory.create_mask_creator("unstructured")(
                PruningMaskCreatorArgs(parameter=lin.weight, sparsity=sparsity, scores=lin.weight.abs()))
            new = lin.weight * mask
        lin.weight.copy_(new)
        del new
    return mem.record()


def worker_main(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rec = {"shear": worker_shear, "llmc": worker_llmc, "layer": worker_layer}[kind](spec)
    Path(spec["out"], "bench_run.json").write_text(json.dumps(rec))


# ---------------------------------------------------------------- the driver

def run_one(py: str, kind: str, spec: dict, log) -> dict:
    """One run in its own process of ``py`` (``benchlib.measure``: wall time, exit code, and the peak RSS the
    process reads itself, VmHWM, not ``ru_maxrss`` of a child, which starts from this driver's mark), and what
    the worker recorded (``bench_run.json``); no PYTHONPATH, so llm-compressor's venv sees nothing of shear's."""
    spec_path = Path(spec["out"] + ".json")
    spec_path.write_text(json.dumps(spec))
    meas = benchlib.measure([__file__, "--worker", kind, str(spec_path)], log=log, threads=spec["threads"], python=py,
                            env={"MKL_NUM_THREADS": spec["threads"], "PYTHONPATH": None})
    rc = meas.pop("rc")
    rec = {"tool": kind, "method": spec["method"], "point": spec["point"], **meas, "rc": rc}
    done = Path(spec["out"], "bench_run.json")
    if rc == 0 and done.exists():
        rec.update(json.loads(done.read_text()))
    return rec


def check_and_score(run_dir: str, dense, tok, text: str, windows: int, point: str) -> dict:
    """PPL by the one protocol, zeros per target linear, N:M validity, untouched non-targets."""
    import torch

    from shear.eval.perplexity import eval_text
    from shear.importance.calibrate import decoder_layers, is_matmul
    from shear.models import load_model
    from shear.sparse.masks import is_nm

    model = load_model(run_dir)
    names = {m: n for n, m in model.named_modules()}
    targets = {names[m] for blk in decoder_layers(model) for m in blk.modules() if is_matmul(m)}
    ref = dict(dense.named_parameters())
    zeros = numel = 0
    nm_ok, other_same = True, True
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if mod in targets and name.endswith("weight"):
            zeros += int((p == 0).sum())
            numel += p.numel()
            if ":" in point:
                nm_ok &= is_nm(p != 0, *map(int, point.split(":")))
        else:
            other_same &= bool(torch.equal(p, ref[name]))
    ppl = eval_text(model, tok, text, seq_len=128, max_windows=windows)
    return {"ppl": round(ppl.ppl, 3), "sparsity": round(zeros / numel, 4), "nm_ok": nm_ok if ":" in point else None,
            "non_targets_untouched": other_same, "protocol": ppl.protocol_line()}


def table(results: list[dict], dense_ppl: float) -> str:
    """shear and llm-compressor side by side, one row per (method, point)."""
    by = {(r["tool"], r["method"], r["point"]): r for r in results}
    rows = []
    for m in METHODS:
        for pt in POINTS:
            s, c = by.get(("shear", m, pt)), by.get(("llmc", m, pt))
            if s is None and c is None:
                continue
            row = {"method": m, "point": pt if ":" in pt else f"{float(pt):.0%}",
                   "ratio": s["ppl"] / c["ppl"] if s and c and s.get("ppl") and c.get("ppl") else None}
            for tool, r in (("shear", s), ("llmc", c)):
                row.update({f"{tool} {k}": r and r.get(k) for k in ("ppl", "wall_s", "prune_s", "peak_mb", "prune_peak_mb")})
            rows.append(row)
    cols = [("method", "method"), ("point", "point"), ("shear ppl", "shear PPL", ".2f"), ("llmc ppl", "llm-c PPL", ".2f"),
            ("ratio", "shear/llm-c PPL", ".3f")]
    for k, head, spec in (("wall_s", "wall s", ".1f"), ("prune_s", "prune s", ".1f"), ("peak_mb", "peak MB", ".0f"),
                          ("prune_peak_mb", "prune Δ MB", ".1f")):
        cols += [(f"shear {k}", f"shear {head}", spec), (f"llmc {k}", f"llm-c {head}", spec)]
    return f"dense PPL {dense_ppl:.3f}\n\n" + benchlib.table(rows, cols, missing="n/a")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="reference-teacher", help="model name or directory (shear.models names resolve)")
    ap.add_argument("-o", "--out", default="/tmp/llmc/bench", help="output directory (models, calib.pt, results.json)")
    ap.add_argument("--venv", default=str(Path.home() / ".cache" / "shear" / "llmc-venv"),
                    help="llm-compressor's virtualenv, made here once")
    ap.add_argument("--points", nargs="+", default=list(POINTS), help="sparsities and N:M patterns")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward, both tools")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every run")
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--layer", type=int, default=0, help="also prune one N x N linear in each venv (SparseGPT "
                                                          "50%% and 2:4, magnitude 50%%): time and memory at a real "
                                                          "layer size; 0 = skip")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from shear.data.text import calibration_ids
    from shear.eval.perplexity import eval_text, load_eval_text
    from shear.models import load_model, load_tokenizer, resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llmc_py = ensure_venv(Path(args.venv).expanduser())
    versions = {"shear venv": {"torch": torch.__version__, "transformers": transformers.__version__},
                "llm-compressor venv": venv_versions(llmc_py)}
    model_dir = str(Path(resolve_model_path(args.model)).resolve())
    tok = load_tokenizer(model_dir)
    ids = calibration_ids(tok, args.n_samples, args.seq_len, seed=0)
    torch.save(ids, out / "calib.pt")
    torch.set_num_threads(args.threads)
    text = load_eval_text("shakespeare", "validation")
    dense = load_model(model_dir)
    dense_ppl = eval_text(dense, tok, text, seq_len=128, max_windows=args.eval_windows)
    print(f"versions {json.dumps(versions)}\ndense PPL {dense_ppl.ppl:.3f} ({dense_ppl.protocol_line()})", flush=True)

    with open(out / "runs.log", "w") as log:
        results = model_runs(args, model_dir, llmc_py, out, dense, tok, text, log)
        layer = layer_runs(args, llmc_py, out, log) if args.layer else []
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16]
    report = {"versions": versions, "model": model_dir, "weights_sha256_16": digest, "calibration": list(ids.shape),
              "batch_size": args.batch_size, "threads": args.threads, "dense_ppl": round(dense_ppl.ppl, 3),
              "protocol": dense_ppl.protocol_line(), "runs": results, "layer": layer}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(table(results, dense_ppl.ppl))
    for r in layer:
        print(f"layer {args.layer}: {r['tool']} {r['method']} {r['point']}: prune {r.get('prune_s')} s, "
              f"prune peak +{r.get('prune_peak_mb')} MB (rc {r['rc']})")


def model_runs(args, model_dir: str, llmc_py: Path, out: Path, dense, tok, text: str, log) -> list[dict]:
    """Every (point, method) by shear then llm-compressor, each scored as it finishes."""
    results = []
    for pt in args.points:
        for m in args.methods:
            for kind, py in (("shear", sys.executable), ("llmc", str(llmc_py))):
                if kind == "llmc" and m == "magnitude" and ":" in pt:
                    continue  # llm-compressor has no N:M magnitude mask
                run_dir = out / f"{kind}-{m}-{pt.replace(':', 'of')}"
                spec = {"model": model_dir, "calib": str(out / "calib.pt"), "method": m, "point": pt,
                        "batch_size": args.batch_size, "threads": args.threads, "out": str(run_dir)}
                log.write(f"\n===== {kind} {m} {pt}\n")
                log.flush()
                rec = run_one(py, kind, spec, log)
                if rec["rc"] == 0:
                    rec.update(check_and_score(str(run_dir), dense, tok, text, args.eval_windows, pt))
                print(json.dumps(rec), flush=True)
                results.append(rec)
    return results


def layer_runs(args, llmc_py: Path, out: Path, log) -> list[dict]:
    """One ``--layer`` square linear per (method, point, tool): prune time and memory at a real layer size."""
    recs = []
    for method, pt in (("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("magnitude", "0.5")):
        for kind, py in (("shear", sys.executable), ("llmc", str(llmc_py))):
            spec = {"tool": kind, "n": args.layer, "method": method, "point": pt, "threads": args.threads,
                    "out": str(out / f"layer-{kind}-{method}-{pt.replace(':', 'of')}")}
            Path(spec["out"]).mkdir(exist_ok=True)
            log.write(f"\n===== layer {args.layer} {kind} {method} {pt}\n")
            log.flush()
            rec = dict(run_one(py, "layer", spec, log), tool=kind)
            print(json.dumps(rec), flush=True)
            recs.append(rec)
    return recs

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
