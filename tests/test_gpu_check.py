"""tools/gpu_check.py: the same script on CPU (``--device cpu --tiny``, the Triton kernel interpreted) so its
code paths break here before they break on a GPU; without CUDA its default run skips with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"
STEPS = ["prune_flap", "prune_stream", "sparsify_wanda", "sparsify_sparsegpt", "kd_train", "sparse_kernel"]


def _run(args, interpret: bool, timeout: int = 600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1"}
    if interpret:  # read by triton at import: only a fresh process can interpret the kernel
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_cpu_run_passes_every_step(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gc.json"
    p = _run(["--device", "cpu", "--tiny", "--out", str(out), "--kd-steps", "2"], interpret=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["schema"] == "shear-gpu-check/1" and r["ok"] is True and r["device"] == "cpu"
    assert [s["name"] for s in r["steps"]] == STEPS
    assert all(s["status"] == "pass" and s["error"] is None and s["time_s"] >= 0 for s in r["steps"]), r["steps"]
    assert all(s["peak_gpu_bytes"] is None for s in r["steps"])  # no GPU: no figure, not a guess
    d = {s["name"]: s["details"] for s in r["steps"]}
    assert d["prune_flap"]["params_after"] < d["prune_flap"]["params_before"]
    assert d["prune_stream"]["params_after"] == d["prune_flap"]["params_after"]
    assert d["prune_stream"]["same_tensors_as_in_memory"] is True
    assert d["sparsify_wanda"]["pruned_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(d["kd_train"]["losses"]) == 2 and d["kd_train"]["student"] == "pruned"
    assert d["sparse_kernel"]["interpreted"] and all(row["max_rel_error"] <= 2e-2 for row in d["sparse_kernel"]["rows"])


def test_a_failing_step_does_not_stop_the_rest(tmp_path):
    """Without the interpreter on CPU the kernel step is skipped (not failed); a broken step is recorded with its
    error while the others still run."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)

    def broken(ctx):
        raise RuntimeError("boom\nsecond line")

    ctx = {"device": torch.device("cpu")}
    rec = gpu_check.run_step("x", broken, ctx, budget_left=10)
    assert rec["status"] == "fail" and rec["error"] == "RuntimeError: boom" and "boom" in rec["traceback"]
    assert gpu_check.run_step("y", lambda c: {"a": 1}, ctx, budget_left=10)["details"] == {"a": 1}
    assert gpu_check.run_step("z", lambda c: {}, ctx, budget_left=0)["status"] == "skip"
    if os.environ.get("TRITON_INTERPRET") != "1":
        rec = gpu_check.run_step("k", gpu_check.step_kernel, {"device": torch.device("cpu"), "args": None}, 10)
        assert rec["status"] == "skip" and "CUDA" in rec["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_skips_in_one_line(tmp_path):
    out = tmp_path / "gc.json"
    p = _run(["--out", str(out)], interpret=False, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "gpu_check: skipped, no CUDA device"
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run(tmp_path):
    """The real check, one layer (the full one is ``python tools/gpu_check.py``)."""
    out = tmp_path / "gc.json"
    p = _run(["--out", str(out), "--layers", "1", "--samples", "8", "--seq-len", "256", "--kd-steps", "2"],
             interpret=False)
    r = json.loads(out.read_text())
    assert p.returncode == 0 and r["ok"], [(s["name"], s["error"]) for s in r["steps"]]
    assert all(s["peak_gpu_bytes"] > 0 for s in r["steps"])
