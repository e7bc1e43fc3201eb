"""export: reload gives identical outputs; uniform plans load as the stock architecture."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from families import family_model, outputs
from shear.analyze import PrunePlan, analyze
from shear.prune import export, prune_
from test_slice import IDS, cases, make_plan

CUSTOM_ALWAYS = ("heads_nonuniform", "mlp_nonuniform", "attn_sublayer", "mlp_sublayer")
HEAD_DIM_FROM_HIDDEN = ("gpt_neox", "gpt2", "opt", "bert")  # head_dim = hidden // heads in the stock code


def expect_stock(fam, kind):
    if kind in CUSTOM_ALWAYS:
        return False
    return not (fam in HEAD_DIM_FROM_HIDDEN and kind in ("heads", "hidden"))


def load(fam, path, remote):
    cls = AutoModel if fam == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(path, trust_remote_code=remote).eval()


@pytest.mark.parametrize("fam,kind", list(cases()))
def test_export_reload_identical(fam, kind, tmp_path):
    model = family_model(fam)
    plan, _ = make_plan(model, kind)
    prune_(model, plan)
    out = export(model, tmp_path / "pruned", recipe={"plan": plan.remove})
    cfg = json.loads((out / "config.json").read_text())
    assert ("auto_map" not in cfg) == expect_stock(fam, kind), cfg.get("shear_layout")
    reloaded = load(fam, out, remote=not expect_stock(fam, kind))
    assert type(reloaded).__name__.startswith("Shear") != expect_stock(fam, kind)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(outputs(reloaded, IDS), outputs(model, IDS), atol=0, rtol=0)
    assert (out / "model.safetensors").exists() and (out / "shear_recipe.yaml").exists()


def test_export_is_atomic(tmp_path, monkeypatch):
    """A failure mid-write leaves neither the target nor a temp directory behind."""
    model = family_model("llama")
    prune_(model, PrunePlan({"layers.0.mlp_channel": [1]}))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_into_existing_run_directory(tmp_path):
    """A directory holding only reports receives the model; its files stay."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("{}")
    model = family_model("llama")
    export(model, tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"report.json", "config.json", "model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_existing_then_overwrites(tmp_path):
    model = family_model("llama")
    export(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export(model, tmp_path / "out")
    prune_(model, PrunePlan({"layers.0.layer": [0]}))
    export(model, tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_reexport_of_a_custom_model_and_tokenizer(tmp_path):
    """A per-layer model loaded with its modeling file exports again (and prunes again) to the same outputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = family_model("qwen3")
    prune_(model, PrunePlan({"layers.1.kv_group": [0], "layers.0.mlp_sublayer": [0]}))
    first = export(model, tmp_path / "a", tokenizer=tokenizer)
    again = load("qwen3", first, remote=True)
    assert "layers.0.mlp_channel" not in [g.name for g in analyze(again).groups]  # dropped MLP: no channels
    prune_(again, PrunePlan({"layers.1.mlp_channel": [3]}))
    second = export(again, tmp_path / "b")
    final = load("qwen3", second, remote=True)
    torch.testing.assert_close(outputs(final, IDS), outputs(again, IDS), atol=0, rtol=0)
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["shear_layers"][1]["num_key_value_heads"] == 1 and cfg["shear_layers"][0]["mlp"] is False
    assert (first / "tokenizer.json").exists()


def test_hidden_not_multiple_of_heads_goes_custom(tmp_path):
    """transformers rejects hidden % heads != 0 for Llama: the export keeps 1 top-level head + layout."""
    model = family_model("llama")
    prune_(model, PrunePlan({"hidden": [0, 1, 2]}))
    out = export(model, tmp_path / "o")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_attention_heads"] == 1 and cfg["hidden_size"] == 61 and "auto_map" in cfg
    assert model.config.num_attention_heads == 4  # the in-memory model is unchanged
    torch.testing.assert_close(outputs(load("llama", out, True), IDS), outputs(model, IDS), atol=0, rtol=0)


def test_layer_removal_with_uniform_widths_stays_stock(tmp_path):
    """Widths of a removed block do not count: the remaining blocks are uniform, so the export is stock."""
    model = family_model("mistral")
    prune_(model, PrunePlan({"layers.0.layer": [0], "layers.0.mlp_channel": [1], "layers.1.mlp_channel": [2, 3]}))
    out = export(model, tmp_path / "o")
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["intermediate_size"] == 94 and cfg["num_hidden_layers"] == 1
    torch.testing.assert_close(outputs(load("mistral", out, False), IDS), outputs(model, IDS), atol=0, rtol=0)


def test_overwrite_replaces_only_what_shear_wrote(tmp_path):
    """Twice into a run directory with overwrite: checkpoints, user files and nested dirs survive."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "checkpoints" / "step-10" / "model.safetensors").write_bytes(b"ckpt")
    (run / "notes.txt").write_text("mine")
    model = family_model("llama")
    export(model, run, recipe={"a": 1})
    prune_(model, PrunePlan({"layers.0.mlp_channel": [1, 2]}))
    export(model, run, overwrite=True)  # no recipe this time: the old recipe file is shear's and goes
    assert (run / "checkpoints" / "step-10" / "model.safetensors").read_bytes() == b"ckpt"
    assert (run / "notes.txt").read_text() == "mine" and not (run / "shear_recipe.yaml").exists()
    torch.testing.assert_close(outputs(load("llama", run, True), IDS), outputs(model, IDS), atol=0, rtol=0)


def test_export_never_replaces_its_own_input(tmp_path):
    """`shear export SRC SRC --overwrite`: the directory the model came from is refused, untouched."""
    src = export(family_model("llama"), tmp_path / "src")
    (src / "README.md").write_text("model card")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    model = load("llama", src, False)
    with pytest.raises(FileExistsError, match="loaded from"):
        export(model, src, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_overwrite_refuses_a_model_shear_did_not_write(tmp_path):
    """A model directory without shear's manifest (e.g. a downloaded checkpoint) is never replaced."""
    theirs = tmp_path / "theirs"
    family_model("llama").save_pretrained(theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    with pytest.raises(FileExistsError, match="did not export"):
        export(family_model("llama"), theirs, overwrite=True)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before


def test_export_refuses_to_clobber_a_foreign_file(tmp_path):
    """A directory without a model but with a user's model.safetensors: refused, the file kept."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors").write_bytes(b"user's")
    with pytest.raises(FileExistsError, match="did not write"):
        export(family_model("llama"), tmp_path / "d")
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == b"user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
