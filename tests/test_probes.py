"""shear refuses or warns instead of failing silently or with a traceback: remote code needs consent,
user errors are one line, overrides go anywhere, a single .txt file is a corpus, degenerate eval
settings are errors. (Run directories, damaged checkpoints, Ctrl-C: test_probes_runs.py.)"""
import json

import pytest
import torch
import yaml

from shear.cli import main


@pytest.fixture(scope="module")
def per_layer_dir(tmp_path_factory, tiny_lm_dir):
    """A per-layer pruned export: its config.json carries auto_map and a modeling file."""
    from shear.analyze import PrunePlan
    from shear.models import load_model, load_tokenizer
    from shear.prune import export, prune_

    model = load_model(str(tiny_lm_dir))
    prune_(model, PrunePlan({"layers.0.mlp_channel": [1, 5, 7]}))
    out = export(model, tmp_path_factory.mktemp("pl") / "model", tokenizer=load_tokenizer(str(tiny_lm_dir)))
    assert "auto_map" in json.loads((out / "config.json").read_text())
    return out


def write_recipe(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def one_line_error(capsys) -> str:
    """The error line, checked to be the last line of stderr, alone, without a traceback (progress bars may precede it)."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert "Traceback" not in err and lines[-1].startswith("shear: error: "), err
    assert not any(line.startswith("shear") for line in lines[:-1]), err
    return lines[-1]


EVAL_FAST = ["--no-speed", "--seq-len", "16", "--max-windows", "1"]


# 1. remote code only with consent ---------------------------------------------------------------

def test_remote_code_needs_consent(per_layer_dir, tmp_path, capsys):
    from shear.config import validate_recipe
    from shear.models import load_model
    from shear.pipeline import build_model

    with pytest.raises(ValueError, match=r"carries its own modeling code \(auto_map: per-layer pruned export\); "
                                         r"pass --trust-remote-code \(or model.trust_remote_code: true\)"):
        load_model(str(per_layer_dir))
    assert main(["eval", str(per_layer_dir), *EVAL_FAST]) == 2
    assert str(per_layer_dir) in one_line_error(capsys)
    assert main(["analyze", str(per_layer_dir)]) == 2
    assert "--trust-remote-code" in one_line_error(capsys)
    assert main(["eval", str(per_layer_dir), *EVAL_FAST, "--trust-remote-code"]) == 0
    assert main(["analyze", str(per_layer_dir), "--trust-remote-code"]) == 0
    with pytest.raises(ValueError, match="auto_map"):
        build_model(validate_recipe({"model": {"path": str(per_layer_dir)}}))
    model, _ = build_model(validate_recipe({"model": {"path": str(per_layer_dir), "trust_remote_code": True}}))
    assert type(model).__name__.startswith("Shear")
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(per_layer_dir)},
                     eval={"speed": False, "seq_len": 16, "max_windows": 1})
    assert main(["run", r, "-o", str(tmp_path / "a")]) == 2
    assert "auto_map" in one_line_error(capsys)
    assert main(["run", r, "-o", str(tmp_path / "b"), "--trust-remote-code"]) == 0
    assert yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())["model"]["trust_remote_code"] is True


# 5. one-line errors -----------------------------------------------------------------------------

def _config_only(d, tiny_lm_dir):
    d.mkdir()
    (d / "config.json").write_text((tiny_lm_dir / "config.json").read_text())
    return d


def _corrupt(d, tiny_lm_dir):
    d.mkdir()
    for f in tiny_lm_dir.iterdir():
        data = f.read_bytes()
        (d / f.name).write_bytes(data[:2000] if f.suffix == ".safetensors" else data)
    return d


@pytest.mark.parametrize("case", ["hub_offline", "config_only", "corrupt_safetensors", "non_utf8_txt",
                                  "malformed_jsonl", "bad_override", "bad_yaml_override"])
def test_user_errors_are_one_line(case, tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, data={"seq_len": 16},
                          train={"steps": 1, "batch_size": 2})
    bad_txt, bad_jsonl = tmp_path / "latin1.txt", tmp_path / "broken.jsonl"
    bad_txt.write_bytes("caf\xe9 au lait\n\nencore".encode("latin-1"))
    bad_jsonl.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    argv, named = {
        "hub_offline": (["eval", "some-org/some-model"], "some-org/some-model: not a local directory, and the hub is offline"),
        "config_only": (["eval", str(_config_only(tmp_path / "c", tiny_lm_dir))], "has a config.json but no weights"),
        "corrupt_safetensors": (["eval", str(_corrupt(tmp_path / "x", tiny_lm_dir)), *EVAL_FAST], "corrupt or truncated weights"),
        "non_utf8_txt": (["eval", str(tiny_lm_dir), *EVAL_FAST, "--dataset", str(bad_txt)], f"{bad_txt}: not UTF-8 text (byte 3"),
        "malformed_jsonl": (["run", recipe, "-o", str(tmp_path / "o"), f"data.source={bad_jsonl}"], f"{bad_jsonl}:3: not valid JSON"),
        "bad_override": (["run", recipe, "train.lr=abc"], "recipe.train.lr: Input should be a valid number"),
        "bad_yaml_override": (["run", recipe, "train.lr=[abc"], "override 'train.lr=[abc': the value is not valid YAML"),
    }[case]
    assert main(argv) == 2
    assert named in one_line_error(capsys)
    with pytest.raises(Exception):  # --debug: the real exception and its traceback
        main(["--debug", *argv])


def test_unexpected_errors_hint_at_debug(monkeypatch, capsys):
    import shear.cli.run

    def boom(args):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr(shear.cli.run, "_cmd_recipes", boom)
    assert main(["recipes"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("shear: unexpected error: RuntimeError: something nobody planned for "
                   "(rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError):
        main(["recipes", "--debug"])  # --debug after the subcommand works too


# 6. overrides after options ---------------------------------------------------------------------

def test_override_after_output_option(tiny_lm_dir, tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, train={"steps": 1})
    assert main(["run", r, "-o", str(tmp_path / "o"), "train.lr=abc"]) == 2  # reached the recipe, not argparse
    assert "recipe.train.lr" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        main(["run", r, "-o", str(tmp_path / "o"), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


# 7. a single .txt file is a corpus --------------------------------------------------------------

def test_single_txt_file_is_split_into_documents(tiny_text, tmp_path):
    from shear.data.text import DataConfig, load_text_splits, split_documents

    f = tmp_path / "one.txt"
    f.write_text(tiny_text)
    splits = load_text_splits(DataConfig(source=str(f)))
    n_train, n_val = len(splits["train"]), len(splits["validation"])
    assert n_train >= 10 and n_val >= 1
    docs = list(splits["train"]["text"]) + list(splits["validation"]["text"])
    assert sorted(docs) == sorted(split_documents(tiny_text))
    assert sum(len(d) for d in docs) >= 0.95 * len(tiny_text.strip())
    paras = split_documents("first paragraph\n\nsecond one\n \nthird")
    assert paras == ["first paragraph", "second one", "third"]  # blank-line boundaries, text kept
    chunks = split_documents("word " * 400)  # no blank line: size chunks cut at spaces
    assert len(chunks) >= 10 and "".join(chunks) == "word " * 400 and all(c.endswith(" ") for c in chunks)


# 8. degenerate eval / data settings -------------------------------------------------------------

def test_seq_len_one_is_an_error(tiny_lm_dir, capsys):
    from shear.data.text import DataConfig
    from shear.eval.config import EvalConfig

    for cls in (DataConfig, EvalConfig):
        with pytest.raises(ValueError, match="at least 2"):
            cls(seq_len=1)
    assert main(["eval", str(tiny_lm_dir), "--seq-len", "1"]) == 2
    assert "seq_len: must be at least 2" in one_line_error(capsys)


def test_seq_len_beyond_the_models_positions(tiny_lm_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_lm_dir), "--no-speed", "--seq-len", "200"]) == 2
    assert "seq_len=200 exceeds the model's max_position_embeddings=128" in one_line_error(capsys)
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, data={"seq_len": 129},
                     train={"steps": 1}, export={})
    assert main(["run", r, "-o", str(tmp_path / "o")]) == 2
    assert "data.seq_len=129 exceeds the model's max_position_embeddings=128" in one_line_error(capsys)
    assert not (tmp_path / "o" / "train").exists()


def test_nan_perplexity_is_an_error(tiny_lm_dir, tmp_path, capsys):
    from shear.models import load_model, load_tokenizer

    model = load_model(str(tiny_lm_dir))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    load_tokenizer(str(tiny_lm_dir)).save_pretrained(tmp_path / "nan")
    assert main(["eval", str(tmp_path / "nan"), *EVAL_FAST]) == 2
    err = one_line_error(capsys)
    assert f"{tmp_path / 'nan'}: perplexity is nan" in err and "check its weights" in err
