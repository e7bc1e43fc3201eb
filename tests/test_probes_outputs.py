"""Outputs are never lost or mixed: --restart deletes only what shear wrote and never a recipe's input, a
refused or failed command leaves an existing output as it was, all forms of an export are published
together, and one output directory takes one command at a time (issue 19)."""
import importlib
import json

import pytest
import yaml

from shear.cli import main
from test_probes import one_line_error, write_recipe
from test_probes_runs import recipe  # noqa: F401 (fixture: a 2-step training recipe on the tiny model)


def test_restart_never_deletes_the_recipes_input(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "o"
    a = write_recipe(tmp_path / "a.yaml", model={"path": str(tiny_lm_dir)}, export={})
    assert main(["run", a, "-o", str(out)]) == 0
    b = write_recipe(tmp_path / "b.yaml", model={"path": str(out / "model")}, export={"dir": str(tmp_path / "m2")})
    assert main(["run", b, "-o", str(out)]) == 2
    err = one_line_error(capsys)
    assert "changed: model.path" in err and "--restart to start it over" not in err
    assert f"--restart would delete {out / 'model'}, which the recipe reads (model.path)" in err
    assert main(["run", b, "-o", str(out), "--restart"]) == 2
    assert (f"--restart would delete {out / 'model'}, which the recipe reads (model.path); copy it out of {out} "
            "first or write the run elsewhere (-o)") in one_line_error(capsys)
    assert (out / "model" / "model.safetensors").exists() and (out / "recipe.yaml").exists()


def test_restart_keeps_files_shear_did_not_write(recipe, tmp_path, caplog):
    out = tmp_path / "o"
    assert main(["run", recipe, "-o", str(out)]) == 0
    (out / "train" / "mine.txt").write_text("mine")
    (out / "train" / "checkpoints" / "step-2" / "state.json").write_text("{}")  # shear's: goes
    assert main(["run", recipe, "-o", str(out), "--restart", "train.lr=1e-3"]) == 0
    assert (out / "train" / "mine.txt").read_text() == "mine"
    assert "--restart: kept train/mine.txt (not written by shear)" in caplog.text
    assert "removed the previous run's recipe.yaml, run.json, summary.json, train" in caplog.text
    assert json.loads((out / "train" / "checkpoints" / "step-2" / "state.json").read_text())["step"] == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 1e-3


def _sparsity_of(d):
    return yaml.safe_load((d / "shear_recipe.yaml").read_text())["sparsify"]["sparsity"]


def test_sparsify_publishes_both_forms_and_the_report_together(tiny_lm_dir, tmp_path, monkeypatch, caplog):
    import shear.sparse.export

    out = tmp_path / "out"
    args = ["sparsify", str(tiny_lm_dir), "--method", "magnitude", "-o", str(out)]
    assert main(args + ["--sparsity", "0.3"]) == 0
    (out / ".model.tmp-0123abcd").mkdir()  # what a kill -9 during an export leaves
    (out / ".model.tmp-0123abcd" / "model.safetensors").write_text("partial")
    (out / ".notes.tmp-mine").write_text("mine")  # not a name shear gives: kept

    def killed(*a, **k):  # the dense form is written, the compressed one never comes
        raise RuntimeError("killed")

    monkeypatch.setattr(shear.sparse.export, "_compression_config", killed)
    with pytest.raises(RuntimeError, match="killed"):
        main(["--debug", *args, "--sparsity", "0.5", "--overwrite"])
    assert _sparsity_of(out / "model") == _sparsity_of(out / "compressed") == 0.3  # the earlier run, whole
    assert json.loads((out / "report.json").read_text())["sparsity"] == 0.3
    assert f"{out}: removed .model.tmp-0123abcd, left by an interrupted export" in caplog.text
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".notes.tmp-mine", ".shear.lock"]

    monkeypatch.undo()
    assert main(args + ["--sparsity", "0.5", "--overwrite"]) == 0
    assert _sparsity_of(out / "model") == _sparsity_of(out / "compressed") == 0.5
    assert json.loads((out / "report.json").read_text())["export"]["model"]["dir"] == str(out / "model")
    assert main(args + ["--sparsity", "0.4", "--overwrite", "--no-compressed"]) == 0  # the old compressed form goes
    assert _sparsity_of(out / "model") == 0.4 and not (out / "compressed").exists()


def test_refused_prune_leaves_the_finished_output_as_it_was(tiny_lm_dir, tiny_text, tmp_path, capsys, monkeypatch):
    exporting = importlib.import_module("shear.prune.export")  # shear.prune.export is also the function

    (tmp_path / "calib.txt").write_text(tiny_text)
    d = tmp_path / "d"
    args = ["prune", str(tiny_lm_dir), "--estimator", "magnitude_l2", "--structures", "mlp", "-o", str(d)]
    assert main(args + ["--ratio", "0.1"]) == 0
    before = {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}
    assert set(before) >= {"report.json", "plans.json", "kept_widths.png"}
    weights = (d / "model" / "model.safetensors").read_bytes()

    for again in (["--ratio", "0.2"], ["--ratio", "0.1"]):  # another prune, or the same one redone
        assert main(args + again) == 2
        assert one_line_error(capsys).endswith(f"{d} already holds a finished prune (report.json, model); pass "
                                               "--overwrite to replace it, or -o elsewhere")
        assert {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()} == before
        assert (d / "model" / "model.safetensors").read_bytes() == weights

    assert main(args + ["--ratio", "0.9", "--overwrite"]) == 2  # fails in the work: nothing in D changes
    assert "cannot be reached" in one_line_error(capsys)
    assert {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()} == before
    with monkeypatch.context() as m:  # fails at the export, after the reports are written: in the staging only
        m.setattr(exporting, "layout_of", lambda model: (_ for _ in ()).throw(RuntimeError("disk full")))
        with pytest.raises(RuntimeError, match="disk full"):
            main(["--debug", *args, "--ratio", "0.2", "--overwrite"])
    assert {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()} == before
    (d / "notes.txt").write_text("mine")
    assert main(args + ["--ratio", "0.2", "--overwrite"]) == 0
    report = json.loads((d / "report.json").read_text())
    assert report["target"]["ratio"] == 0.2 and report["plot"] == str(d / "kept_widths.png")
    assert report["model_dir"] == str(d / "model")
    assert yaml.safe_load((d / "model" / "shear_recipe.yaml").read_text())["prune"]["target"]["ratio"] == 0.2
    assert (d / "notes.txt").read_text() == "mine"
    assert main(args + ["--ratio", "0.1", "--overwrite", "--no-export"]) == 0  # the old model would not match
    assert not (d / "model").exists() and json.loads((d / "report.json").read_text())["target"]["ratio"] == 0.1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_finished_run_is_said_up_front(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    import shear.pipeline

    out = tmp_path / "o"
    a = write_recipe(tmp_path / "a.yaml", model={"path": str(tiny_lm_dir)}, export={})
    assert main(["run", a, "-o", str(out)]) == 0
    monkeypatch.setattr(shear.pipeline, "build_model", lambda recipe: pytest.fail("work redone"))
    assert main(["run", a, "-o", str(out)]) == 2
    assert one_line_error(capsys).endswith(f"{out / 'model'} already holds a model (a finished run?): nothing redone; "
                                           "set export.overwrite=true to replace it, pass --restart, or write "
                                           "elsewhere (-o)")
    monkeypatch.undo()
    assert main(["run", a, "-o", str(out), "export.overwrite=true"]) == 0


def test_failed_resume_rewrites_nothing(recipe, tmp_path, capsys):
    out = tmp_path / "o"
    prune = ["prune.target.ratio=0.2", f"importance.source={tmp_path / 'corpus.txt'}", "importance.n_samples=2",
             "importance.seq_len=16", "train.steps=1", "importance.estimator=flap", "prune.allocation=global"]
    assert main(["run", recipe, "-o", str(out), *prune]) == 0
    files = ["recipe.yaml", "run.json", "prune/report.json", "prune/plans.json", "prune/kept_widths.png"]
    before = {f: (out / f).read_bytes() for f in files}
    assert main(["run", recipe, "-o", str(out), *prune, "prune.target.ratio=0.4", "--resume"]) == 2
    assert "made by a differently shaped model" in one_line_error(capsys)
    assert {f: (out / f).read_bytes() for f in files} == before
    assert [p.name for p in out.rglob(".*") if p.name != ".shear.lock"] == []  # no staging left
    assert main(["run", recipe, "-o", str(out), *prune, "train.lr=1e-3", "--resume"]) == 0  # fits: recorded
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 1e-3
    assert json.loads((out / "run.json").read_text())["changes"][-1]["keys"] == {"train.lr": [0.0003, 0.001]}
    assert json.loads((out / "prune" / "report.json").read_text())["plot"] == str(out / "prune" / "kept_widths.png")
    assert [p.name for p in out.rglob(".*") if p.name != ".shear.lock"] == []


def test_one_command_per_output_directory(tiny_lm_dir, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")  # POSIX: elsewhere nothing is locked

    out = tmp_path / "o"
    out.mkdir()
    a = write_recipe(tmp_path / "a.yaml", model={"path": str(tiny_lm_dir)}, export={})
    commands = [["run", a, "-o", str(out)], ["sparsify", str(tiny_lm_dir), "--method", "magnitude", "--sparsity", "0.5",
                "-o", str(out)], ["prune", str(tiny_lm_dir), "--estimator", "magnitude_l2", "-o", str(out)]]
    with open(out / ".shear.lock", "a") as held:  # another shear command is writing there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for argv in commands:
            assert main(argv) == 2
            assert one_line_error(capsys).endswith(f"{out} is in use by another shear command (it holds .shear.lock); "
                                                   "wait for it to finish or write elsewhere (-o)")
        assert sorted(p.name for p in out.iterdir()) == [".shear.lock"]
    assert main(commands[0]) == 0  # released: the next command runs


def test_restart_clears_the_learned_masks_training(tmp_path):
    """prune.learn trains in OUT/learn: a restart that left its checkpoints would resume the old masks."""
    from shear.rundir import clear_run_dir

    out = tmp_path / "o"
    (out / "learn" / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "learn" / "checkpoints" / "step-1" / "state.json").write_text("{}")
    (out / "learn" / "metrics.jsonl").write_text("{}\n")
    (out / "recipe.yaml").write_text("{}")
    assert clear_run_dir(out) == (["recipe.yaml", "learn"], [])
    assert list(out.iterdir()) == []
