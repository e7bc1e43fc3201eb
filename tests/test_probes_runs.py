"""Run directories belong to one recipe (refuse / --resume / --restart), a damaged checkpoint is skipped
for the one before it, and Ctrl-C ends `shear run` with rc 130 and where the last checkpoint is."""
import json

import pytest
import torch
import yaml

from shear.cli import main
from test_probes import one_line_error, write_recipe


@pytest.fixture
def recipe(tiny_lm_dir, tiny_text, tmp_path):
    (tmp_path / "corpus.txt").write_text(tiny_text)
    return write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)},
                        data={"source": str(tmp_path / "corpus.txt"), "seq_len": 16},
                        train={"steps": 2, "batch_size": 2, "eval_batches": 1, "save_every": 1, "log_every": 1})


def _records(out, step):
    lines = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("step") == step and "lr" in r]


def test_changed_recipe_refused_resumed_restarted(recipe, tmp_path, capsys, caplog):
    out = tmp_path / "o"
    assert main(["run", recipe, "-o", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "train" / "checkpoints" / "step-2" / "trainable.safetensors").read_bytes()

    assert main(["run", recipe, "-o", str(out), "train.lr=1e-3", "seed=1"]) == 2
    assert "changed: seed (0 -> 1), train.lr (0.0003 -> 0.001)); pass --resume" in one_line_error(capsys)
    assert (out / "train" / "checkpoints" / "step-2" / "trainable.safetensors").read_bytes() == before

    assert main(["run", recipe, "-o", str(out), "train.log_every=5", "eval.seq_len=16"]) == 0  # not result keys

    assert main(["run", recipe, "-o", str(out), "--resume", "train.lr=1e-3", "train.steps=3"]) == 0
    assert "continuing a run whose recipe changed (train.lr, train.steps)" in caplog.text
    run = json.loads((out / "run.json").read_text())
    assert run["changes"][-1]["keys"] == {"train.lr": [0.0003, 0.001], "train.steps": [2, 3]}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 0.001
    assert _records(out, 3)[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # the new lr applies (cosine end: min_lr_ratio)

    assert main(["run", recipe, "-o", str(out), "--restart"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # not shear's: kept
    assert json.loads((out / "run.json").read_text())["changes"] == []
    assert sorted(p.name for p in (out / "train" / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not _records(out, 3)


def test_changed_prune_ratio_is_refused_not_a_size_mismatch(recipe, tmp_path, capsys):
    out = tmp_path / "o"
    prune = ["prune.target.ratio=0.2", f"importance.source={tmp_path / 'corpus.txt'}", "importance.n_samples=2",
             "importance.seq_len=16", "train.steps=1", "importance.estimator=flap", "prune.allocation=global"]
    assert main(["run", recipe, "-o", str(out), *prune]) == 0
    assert main(["run", recipe, "-o", str(out), *prune, "prune.target.ratio=0.4"]) == 2
    assert "changed: prune.target.ratio (0.2 -> 0.4)" in one_line_error(capsys)
    assert main(["run", recipe, "-o", str(out), *prune, "prune.target.ratio=0.4", "--resume"]) == 2
    assert "made by a differently shaped model" in one_line_error(capsys)


def test_damaged_latest_checkpoint_falls_back(tmp_path, caplog, capsys):
    from test_train import _run

    first = _run(tmp_path, "r", steps=4, save_every=2, resume=True)
    ck = tmp_path / "r" / "checkpoints"
    weights = ck / "step-4" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    again = _run(tmp_path, "r", steps=4, save_every=2, resume=True)
    assert f"checkpoint {ck / 'step-4'} is unreadable" in caplog.text
    assert f"resuming from {ck / 'step-2'} (step 2)" in capsys.readouterr().out
    for k, v in first.model.state_dict().items():  # steps 3-4 redone: the same weights
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_ctrl_c_exits_130_naming_the_last_checkpoint(recipe, tmp_path, capsys, monkeypatch):
    import shear.train.trainer as trainer

    real = trainer._log

    def interrupt_at_step_2(accelerator, path, rec):
        real(accelerator, path, rec)
        if rec.get("step") == 2:  # after the step-1 checkpoint, before the step-2 one
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_log", interrupt_at_step_2)
    out = tmp_path / "o"
    assert main(["run", recipe, "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"shear: interrupted; last checkpoint: {out / 'train' / 'checkpoints' / 'step-1'} "
                                            "(the same command resumes from it)")
    monkeypatch.setattr(trainer, "_log", real)
    assert main(["train", recipe, "-o", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().out
