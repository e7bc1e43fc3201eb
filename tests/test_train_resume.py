"""A run killed with SIGKILL mid-way resumes from its last checkpoint and ends with exactly the
weights of an uninterrupted run (CPU, fp32, fixed seed)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = str(Path(__file__).with_name("test_train_worker.py"))
CFG = {"steps": 24, "batch_size": 4, "lr": 5e-3, "warmup_steps": 3, "save_every": 4, "keep_checkpoints": 2,
       "log_every": 4, "eval_every": 8, "eval_batches": 1, "seed": 3,
       "lora": None}


def _cmd(out, cfg, *extra):
    return [sys.executable, WORKER, str(out), json.dumps(cfg), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def _kill_then_resume(tmp_path, cfg, name):
    out = tmp_path / name
    proc = subprocess.Popen(_cmd(out, cfg, "--sleep", "0.01"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = out / "checkpoints"
    deadline = time.time() + 120
    while not (ck / "step-8").exists():  # wait until two checkpoints are on disk, then kill hard
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "worker made no checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final.safetensors").exists() and not (ck / f"step-{cfg['steps']}").exists()
    done = subprocess.run(_cmd(out, cfg), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    return out


def _reference(tmp_path, cfg):
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(ref, cfg), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return ref


def _assert_same_weights(a, b):
    wa, wb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    resumed = _kill_then_resume(tmp_path, CFG, "killed")
    _assert_same_weights(resumed, _reference(tmp_path, CFG))
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert kept == ["step-20", "step-24"]  # rotation keeps the newest two, no temp dirs left


@pytest.mark.slow
def test_resume_after_sigkill_with_lora_dropout(tmp_path):
    cfg = {**CFG, "lora": {"r": 2, "dropout": 0.2, "target_modules": ["q_proj", "up_proj"]}}
    resumed = _kill_then_resume(tmp_path, cfg, "killed")
    _assert_same_weights(resumed, _reference(tmp_path, cfg))
