"""Recipe validation: unknown keys, wrong types and ranges fail early with the dotted key."""
from pathlib import Path

import pytest
import yaml

from shear.config import load_recipe, merge, parse_overrides, validate_recipe

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_dotted_path(tmp_path):
    p = _write(tmp_path, {"model": {"path": "x"}, "train": {"steps": 5, "lrr": 0.1}})
    with pytest.raises(ValueError) as e:
        load_recipe(p)
    assert "recipe.train.lrr: unknown key" in str(e.value)


def test_unknown_section_is_rejected():
    with pytest.raises(ValueError, match=r"recipe\.pruning: unknown key"):
        validate_recipe({"model": {"path": "x"}, "pruning": {}})


def test_wrong_type_names_dotted_path_and_value():
    with pytest.raises(ValueError) as e:
        validate_recipe({"model": {"path": "x"}, "train": {"steps": "many"}})
    msg = str(e.value)
    assert "recipe.train.steps" in msg and "'many'" in msg


def test_out_of_range_value():
    with pytest.raises(ValueError, match=r"recipe\.data\.seq_len"):
        validate_recipe({"model": {"path": "x"}, "data": {"seq_len": 0}})


def test_missing_required_key():
    with pytest.raises(ValueError, match=r"recipe\.model: required key is missing"):
        validate_recipe({})


def test_overrides_use_dotted_paths_and_yaml_values(tmp_path):
    p = _write(tmp_path, {"model": {"path": "x"}, "data": {"seq_len": 64}})
    r = load_recipe(p, ["data.seq_len=32", "data.source=[a.txt, b.txt]", "seed=7"])
    assert r.data.seq_len == 32 and r.data.source == ["a.txt", "b.txt"] and r.seed == 7
    with pytest.raises(ValueError, match=r"recipe\.data\.seq_lenn: unknown key"):
        load_recipe(p, ["data.seq_lenn=32"])
    with pytest.raises(ValueError, match="expected key=value"):
        parse_overrides(["data.seq_len"])


def test_merge_is_recursive():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_shipped_recipe_validates():
    recipes = [p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate"]
    assert recipes, "no recipes shipped"
    for p in recipes:
        first = p.read_text().splitlines()[0]
        assert first.startswith("# ") and "shear" in first, f"{p}: first line must be the command that runs it"
        r = load_recipe(p)
        assert r.description, f"{p}: needs a one-line description"


def test_stages_must_fit_together():
    with pytest.raises(ValueError, match=r"recipe: .*distill: distillation happens during training"):
        validate_recipe({"model": {"path": "x"}, "distill": {"kd_weight": 1.0}})
    with pytest.raises(ValueError, match=r"distill.teacher: no teacher"):
        validate_recipe({"model": {"path": "x"}, "train": {"steps": 2}, "distill": {}})
    r = validate_recipe({"model": {"path": "x"}, "train": {"steps": 2}, "distill": {"teacher": "t"}})
    assert r.distill.teacher == "t"
