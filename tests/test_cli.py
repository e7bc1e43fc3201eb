"""The command line: recipes listing, clear errors, quickstart recipes kept equal to the shipped YAML."""
from pathlib import Path

import pytest
import yaml

from shear.cli import main
from shear.cli.run import list_recipes

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_lists_every_recipe_with_purpose(capsys):
    rows = list_recipes(ROOT / "recipes")
    names = {n for n, _ in rows}
    assert "reference/pretrain.yaml" in names and all(d for _, d in rows)
    assert main(["recipes"]) == 0
    assert "pretrain.yaml" in capsys.readouterr().out


def test_run_rejects_bad_recipe_before_work(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {path: x}\ntrain: {steps: 2, lr: fast}\n")
    assert main(["run", str(p), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "recipe.train.lr" in err and "'fast'" in err
    assert not (tmp_path / "out").exists(), "nothing may be written before validation passes"


def test_nothing_imports_the_cli_layer():
    """The CLI (shear/cli/) sits on top: no library module imports it (only ``python -m shear``)."""
    pkg = ROOT / "shear"
    offenders = [str(p.relative_to(ROOT)) for p in pkg.rglob("*.py")
                 if pkg / "cli" not in p.parents and p.name != "__main__.py" and "shear.cli" in p.read_text()]
    assert offenders == []
    assert not list(pkg.rglob("commands.py")), "command modules live in shear/cli/"


def test_run_missing_recipe(capsys):
    assert main(["run", "does/not/exist.yaml"]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_quickstart_recipes_equal_shipped_yaml():
    from shear.quickstart import QUICK_PRETRAIN, QUICK_PRUNE

    for data, name in ((QUICK_PRETRAIN, "quick.yaml"), (QUICK_PRUNE, "quick-prune-kd.yaml")):
        assert yaml.safe_load((ROOT / "recipes" / "reference" / name).read_text()) == data, name


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, monkeypatch):
    """The real quickstart (~4 min on 2 cores): recovery must beat pruning, the export must reload."""
    from shear.models import load_model
    from shear.quickstart import quickstart

    monkeypatch.setenv("SHEAR_CACHE", str(tmp_path / "cache"))
    s = quickstart(out_dir=str(tmp_path / "qs"))
    ev = s["eval"]
    assert ev["pruned"]["params"] < ev["original"]["params"]
    assert ev["final"]["ppl"] < ev["pruned"]["ppl"]
    reloaded = load_model(s["model_dir"], trust_remote_code=True)
    assert sum(p.numel() for p in reloaded.parameters()) == ev["final"]["params"]
