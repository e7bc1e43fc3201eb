"""Multi-process runs on CPU (gloo) through `accelerate launch`: the same global batch split over
2 processes gives the losses and weights of one process; calibration split over 2 processes gives the
scores and the prune of one process."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = str(Path(__file__).with_name("test_train_worker.py"))
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": ext,
            "PYTHONPATH": str(Path(__file__).parents[1]), **extra}


def _launcher(nproc: int, *flags) -> list[str]:
    """The command prefix running a script (or ``-m module``) in ``nproc`` processes: plain Python for one, else
    ``accelerate launch`` on CPU (gloo) with ``flags`` (e.g. ``--multi_gpu``)."""
    assert ACCELERATE, "accelerate CLI not found next to the interpreter"
    if nproc == 1:
        return [sys.executable]
    return [ACCELERATE, "launch", *flags, "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(_port())]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def _launch(out, cfg, nproc, *extra, launcher=()):
    _run([*_launcher(nproc, *launcher), WORKER, str(out), json.dumps(cfg), *extra])
    return out


def _recipe(tmp_path, model_dir, text: str, body: str) -> Path:
    """A recipe on ``model_dir`` whose data section reads ``text`` (16-token blocks), then ``body``."""
    src = tmp_path / "text.txt"
    src.write_text(text)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{path: {model_dir}}}\n"
                      f"data: {{source: {src}, seq_len: 16, validation_fraction: 0.1}}\n" + body.format(text=src))
    return recipe


def _losses(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]


def _compare(single, multi):
    (l1, v1), (l2, v2) = _losses(single), _losses(multi)
    assert len(l1) == len(l2) > 0
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(v2), torch.tensor(v1), rtol=1e-5, atol=1e-6)
    w1, w2 = load_file(str(single / "final.safetensors")), load_file(str(multi / "final.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert json.loads((multi / "result.json").read_text())["processes"] == 2


@pytest.mark.distributed
def test_two_process_gloo_matches_single_process(tmp_path):
    assert ACCELERATE, "accelerate CLI not found next to the interpreter"
    base = {"steps": 5, "lr": 5e-3, "log_every": 1, "eval_every": 5, "grad_accum": 2, "resume": False}
    single = _launch(tmp_path / "one", {**base, "batch_size": 8}, 1)
    multi = _launch(tmp_path / "two", {**base, "batch_size": 4}, 2, launcher=("--multi_gpu",))
    _compare(single, multi)


@pytest.mark.distributed
def test_learned_masks_two_processes_match_one(tmp_path):
    """prune.learn under DDP: the same mask draws on every rank (one seed), the Lagrangian counted once per
    step, so losses, the finished shape and the weights equal a single process on the same global batch."""
    assert ACCELERATE, "accelerate CLI not found next to the interpreter"
    base = {"steps": 4, "lr": 5e-3, "log_every": 1, "eval_every": 4, "resume": False}
    single = _launch(tmp_path / "one", {**base, "batch_size": 8}, 1, "--learn")
    multi = _launch(tmp_path / "two", {**base, "batch_size": 4}, 2, "--learn", launcher=("--multi_gpu",))
    _compare(single, multi)
    w = load_file(str(multi / "final.safetensors"))
    assert w["model.layers.0.mlp.up_proj.weight"].shape[0] == 24 and w["model.layers.0.self_attn.k_proj.weight"].shape[0] == 8
    lag = [json.loads(x)["lagrangian"] for x in (multi / "metrics.jsonl").read_text().splitlines() if "lagrangian" in x]
    assert len(lag) == 4 and any(v != 0 for v in lag)


SCORES_WORKER = str(Path(__file__).with_name("distributed_worker.py"))


@pytest.mark.distributed
def test_two_process_calibration_matches_single_process(tmp_path):
    """Gradient (vector, element1, element2) and activation statistics split over 2 gloo processes and
    all-reduced equal one process's: each rank ran only its share of the batches (3 batches: 2 + 1; 10
    per-sample: 5 + 5), both ranks hold the same sums bit for bit, and the Taylor and FLAP prunes plan and
    slice identically. Float sums differ from one process only in their order: fp32 gradient sums by
    < 1e-6 of each tensor's largest entry (4e-7 measured), the fp64 activation sums by < 1e-12; the
    pruned weights (FLAP's compensated biases included) came out equal."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for out, n in ((one, 1), (two, 2)):
        _run([*_launcher(n, "--multi_gpu"), SCORES_WORKER, str(out)])
    single = json.loads((one / "rank-0.json").read_text())
    ranks = [json.loads((two / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert single["world"] == 1 and all(r["world"] == 2 and r["started"] for r in ranks)
    assert single["batches"] == {"vector": 3, "element1": 3, "element2": 10, "activations": 3}
    assert [r["batches"] for r in ranks] == [{"vector": 2, "element1": 2, "element2": 5, "activations": 2},
                                             {"vector": 1, "element1": 1, "element2": 5, "activations": 1}]
    assert ranks[0]["plans"] == ranks[1]["plans"] == single["plans"]
    assert all(single["plans"][est] for est in ("taylor_vector", "flap"))  # something was removed
    ref, got, other = (load_file(str(d / f"rank-{r}.safetensors")) for d, r in ((one, 0), (two, 0), (two, 1)))
    assert set(ref) == set(got) == set(other) and any(k.startswith("element2.fisher.") for k in ref)
    for k, v in ref.items():
        assert torch.equal(got[k], other[k]), k  # every rank holds the same reduced sums
        tol = 1e-12 if v.dtype == torch.float64 else 1e-6
        assert (got[k].double() - v.double()).abs().max() <= tol * v.double().abs().max().clamp_min(1e-30), k


def _has_deepspeed():
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.distributed
@pytest.mark.slow  # DeepSpeed builds its CPU ops once (~2-3 min); later runs take ~30 s
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed (pip install 'shear[deepspeed]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_with_teacher_matches_single_process(tmp_path, stage):
    cfg_file = Path(__file__).parents[1] / "recipes" / "accelerate" / f"zero{stage}.yaml"
    base = {"steps": 3, "lr": 5e-3, "log_every": 1, "eval_every": 3, "resume": False}
    distill = json.dumps({"ce_weight": 0.5, "kd_weight": 1.0, "chunk_size": 7})
    single = _launch(tmp_path / "one", {**base, "batch_size": 8}, 1, "--distill", distill)
    multi = _launch(tmp_path / "ds", {**base, "batch_size": 4}, 2, "--distill", distill,
                    launcher=("--config_file", str(cfg_file)))
    _compare(single, multi)
    assert (tmp_path / "ds" / "checkpoints" / "step-3" / "ds").is_dir()  # DeepSpeed's sharded checkpoint


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed (pip install 'shear[deepspeed]')")
def test_deepspeed_zero3_resume_gives_identical_weights(tmp_path):
    cfg_file = str(Path(__file__).parents[1] / "recipes" / "accelerate" / "zero3.yaml")
    base = {"batch_size": 4, "lr": 5e-3, "scheduler": "constant", "log_every": 1}
    distill = json.dumps({"ce_weight": 0.5, "kd_weight": 1.0})
    ds = ("--config_file", cfg_file)
    whole = _launch(tmp_path / "whole", {**base, "steps": 5}, 2, "--distill", distill, launcher=ds)
    _launch(tmp_path / "parts", {**base, "steps": 3}, 2, "--distill", distill, launcher=ds)
    parts = _launch(tmp_path / "parts", {**base, "steps": 5}, 2, "--distill", distill, launcher=ds)  # resumes at 3
    wa, wb = load_file(str(whole / "final.safetensors")), load_file(str(parts / "final.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_launch_is_refused(tmp_path, monkeypatch):
    """FSDP has no sharded checkpointing or wrap policy in shear: a launch under it fails by name
    (accelerate launch sets ACCELERATE_USE_FSDP) instead of training without resumable checkpoints."""
    from shear.train.accel import build_accelerator
    from shear.train.config import TrainConfig

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP is not supported.*zero3.yaml"):
        build_accelerator(TrainConfig(steps=1), tmp_path)
    assert not (Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml").exists()


@pytest.mark.distributed
def test_shear_run_two_processes_matches_one(tmp_path, tiny_lm_dir, tiny_text):
    """``shear run`` under 2 gloo processes: Taylor calibration split over the ranks, the pruned model
    broadcast from rank 0, rank 0 alone evaluating (original, pruned, final: the other rank waits at the
    side group's barrier), 2 DDP steps, export; the prune, the evaluations and the exported weights equal
    those of one process on the same global batch."""
    recipe = _recipe(tmp_path, tiny_lm_dir, tiny_text,
                     "importance: {{estimator: taylor_vector, n_samples: 6, seq_len: 16, batch_size: 2}}\n"
                     "prune: {{target: {{ratio: 0.3}}, structures: [mlp, heads], allocation: global, round_to: 1}}\n"
                     "train: {{steps: 2, warmup_steps: 0, lr: 1.0e-3, eval_batches: 1, eval_every: 2, resume: false}}\n"
                     "eval: {{dataset: {text}, seq_len: 16, max_windows: 2, speed: false}}\n"
                     "export: {{}}\n")
    runs = {}
    for n, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"run{n}"
        done = _run([*_launcher(n, "--multi_gpu"), "-m", "shear", "run", str(recipe), f"train.batch_size={batch}",
                     "-o", str(out)])
        assert ("2 processes: calibration is split over them" in done.stderr) == (n == 2)
        runs[n] = json.loads((out / "summary.json").read_text()), load_file(str(out / "model" / "model.safetensors"))
    (s1, w1), (s2, w2) = runs[1], runs[2]
    assert s2["train"]["processes"] == 2 and s2["stages"] == s1["stages"] == ["prune", "train", "export", "eval"]
    assert s2["prune"]["params_after"] == s1["prune"]["params_after"] < s1["prune"]["params_before"]
    assert json.loads((tmp_path / "run2" / "prune" / "plans.json").read_text()) == \
           json.loads((tmp_path / "run1" / "prune" / "plans.json").read_text())
    assert set(s2["eval"]) == {"original", "pruned", "final"}
    for name in ("original", "pruned"):
        assert s2["eval"][name]["ppl"] == pytest.approx(s1["eval"][name]["ppl"], rel=1e-5)
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_shear_run_learned_masks_then_recovery_two_processes(tmp_path, tiny_lm_dir, tiny_text):
    """Two trainings in one ``shear run`` under 2 processes (learned masks, then recovery): the process group
    of the run outlives the first one (it used to be destroyed there, and the second Accelerator failed with
    "Default process group has not been initialized")."""
    recipe = _recipe(tmp_path, tiny_lm_dir, tiny_text,
                     "prune: {{target: {{ratio: 0.3}}, structures: [mlp], round_to: 1, learn: {{steps: 2, warmup: 1}}}}\n"
                     "train: {{steps: 2, warmup_steps: 0, batch_size: 2, eval_batches: 1, eval_every: 2, resume: false}}\n"
                     "export: {{}}\n")
    out = tmp_path / "run"
    _run([*_launcher(2, "--multi_gpu"), "-m", "shear", "run", str(recipe), "-o", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == ["prune", "train", "export"] and summary["train"]["processes"] == 2
    assert summary["prune"]["params_after"] < summary["prune"]["params_before"]
