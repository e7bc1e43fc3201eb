"""Encoders end to end (issue 12): a BERT encoder directory is loaded as ``BertModel`` (pooler kept, no LM
head), ``shear prune DIR`` works with each estimator deterministically, the export loads with
``AutoModel`` in a fresh process with the same hidden states, and a sentence-transformers directory keeps
its pooling module. Also: ``--calib`` and the printed calibration line, tokenizer-only directories.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from families import family_config, family_model, outputs
from shear.cli import main
from shear.models import auto_class_for, load_model, load_tokenizer
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.export import export
from shear.prune.pipeline import run_prune

IDS = torch.randint(5, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(5, 128, (8, 16), generator=torch.Generator().manual_seed(2))
SMALL = ["--n-samples", "4", "--seq-len", "32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(d: Path):
    """A WordPiece tokenizer of 128 entries (letters and their ## continuations), built offline."""
    from transformers import BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + list(".,;:!?'-")
    vocab += [f"[unused{i}]" for i in range(128 - len(vocab))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"))


@pytest.fixture
def encoder_dir(tmp_path):
    """A saved BertModel directory with its tokenizer."""
    d = tmp_path / "enc"
    model = family_model("bert")
    model.save_pretrained(d)
    _tokenizer(tmp_path / "tok").save_pretrained(d)
    return d


def test_encoder_loads_as_its_own_class(encoder_dir):
    import transformers

    model, info = transformers.AutoModel.from_pretrained(encoder_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    loaded = load_model(str(encoder_dir))
    assert type(loaded).__name__ == "BertModel" and loaded.pooler is not None
    assert not hasattr(loaded, "lm_head") and not hasattr(loaded, "cls")
    torch.testing.assert_close(outputs(loaded, IDS), outputs(model.eval(), IDS), atol=0, rtol=0)
    cfg = family_config("bert", architectures=["BertForMaskedLM"])
    assert auto_class_for(cfg) == "AutoModelForMaskedLM"
    assert auto_class_for(family_config("llama", architectures=["LlamaForCausalLM"])) == "AutoModelForCausalLM"
    assert auto_class_for(family_config("llama")) == "AutoModelForCausalLM"  # no architectures: as before


def test_masked_lm_keeps_its_head(tmp_path):
    import transformers

    m = transformers.BertForMaskedLM(family_config("bert")).eval()
    m.save_pretrained(tmp_path / "mlm")
    loaded = load_model(str(tmp_path / "mlm"))
    assert type(loaded).__name__ == "BertForMaskedLM"
    torch.testing.assert_close(loaded(input_ids=IDS).logits, m(input_ids=IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("est", ["flap", "wanda_sp", "minitron", "taylor_vector"])
def test_shear_prune_encoder_dir_is_deterministic(encoder_dir, tmp_path, est, capsys):
    plans = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["prune", str(encoder_dir), "--ratio", "0.3", "--estimator", est, "-o", str(out)] + SMALL) == 0
        plans.append((out / "plans.json").read_text())
        rep = json.loads((out / "report.json").read_text())
        assert rep["removed_ratio"] >= 0.3 * 0.9
        cfg = json.loads((out / "model" / "config.json").read_text())
        assert cfg["architectures"] == ["BertModel"]
        assert "auto_map" not in cfg or "AutoModel" in cfg["auto_map"]
    assert plans[0] == plans[1]
    printed = capsys.readouterr().out
    assert "calibration: 4 x 32 tokens from general English" in printed  # a model from elsewhere: English prose
    assert re.search(r"tokenizer Bert\w*Tokenizer", printed)


def test_calib_flag_names_the_text(encoder_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    out = tmp_path / "o"
    assert main(["prune", str(encoder_dir), "--ratio", "0.2", "--calib", str(text), "--no-export",
                 "-o", str(out)] + SMALL) == 0
    line = json.loads((out / "report.json").read_text())["calibration_text"]
    assert re.fullmatch(rf"4 x 32 tokens from importance.source={re.escape(str(text))}, all documents, "
                        r"tokenizer Bert\w*Tokenizer", line), line
    assert f"calibration: {line}" in capsys.readouterr().out


def test_tokenizer_only_directory(tmp_path):
    d = tmp_path / "tok"
    _tokenizer(d).save_pretrained(d)
    assert not (d / "config.json").exists()
    tok = load_tokenizer(str(d))
    assert tok("abc")["input_ids"][0] == 2  # [CLS]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_tokenizer(str(tmp_path))  # neither a model nor a tokenizer directory


RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel
    bad = []
    for d in sys.argv[1:]:
        remote = "auto_map" in json.load(open(d + "/config.json"))
        m, info = AutoModel.from_pretrained(d, trust_remote_code=remote, output_loading_info=True)
        keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        ids = load_file(d + "/expected.safetensors")["ids"]
        with torch.no_grad():
            got = m.eval()(input_ids=ids).last_hidden_state.float()
        want = load_file(d + "/expected.safetensors")["out"]
        if keys or type(m).__name__ not in ("BertModel", "ShearBertModel") or not torch.equal(got, want):
            bad.append([d, type(m).__name__, str(keys)])
    print(json.dumps(bad))
""")


def test_exported_encoder_reloads_with_automodel_in_a_fresh_process(encoder_dir, tmp_path):
    """Uniform widths export as the stock BertModel; per-layer widths through auto_map['AutoModel'],
    loadable only with trust_remote_code. Both give the pruned model's hidden states exactly."""
    import transformers

    dirs = []
    for alloc in ("uniform", "global"):
        model = load_model(str(encoder_dir))
        run_prune(model, None, PruneConfig(target={"ratio": 0.3}, structures=["mlp"], allocation=alloc),
                  ImportanceConfig(n_samples=8, seq_len=16), ids=CALIB)
        out = export(model, tmp_path / alloc)
        cfg = json.loads((out / "config.json").read_text())
        if alloc == "uniform":
            assert "auto_map" not in cfg and cfg["model_type"] == "bert"
        else:
            assert cfg["auto_map"]["AutoModel"].endswith("ShearBertModel")
            with pytest.raises(Exception):
                transformers.AutoModel.from_pretrained(out)  # no consent, no load
            again = load_model(str(out), trust_remote_code=True)  # shear's own loader picks AutoModel too
            assert type(again).__name__ == "ShearBertModel"
            torch.testing.assert_close(outputs(again, IDS), outputs(model, IDS), atol=0, rtol=0)
        save_file({"out": outputs(model, IDS).contiguous(), "ids": IDS}, str(out / "expected.safetensors"))
        dirs.append(str(out))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RELOAD, *dirs], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_sentence_transformers_modules_are_kept(encoder_dir, tmp_path):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (encoder_dir / "modules.json").write_text(json.dumps(modules))
    (encoder_dir / "1_Pooling").mkdir()
    (encoder_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    (encoder_dir / "2_Normalize").mkdir()
    model = load_model(str(encoder_dir))
    run_prune(model, None, PruneConfig(target={"ratio": 0.2}, structures=["hidden"], allocation="uniform"),
              ImportanceConfig(estimator="magnitude_l2", n_samples=8, seq_len=16), ids=CALIB)
    out = export(model, tmp_path / "st")
    assert json.loads((out / "modules.json").read_text()) == modules
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling == {"word_embedding_dimension": model.config.hidden_size, "pooling_mode_mean_tokens": True}
    assert model.config.hidden_size < 64 and (out / "2_Normalize").is_dir()
    manifest = json.loads((out / "shear_export.json").read_text())["files"]
    assert {"modules.json", "1_Pooling", "2_Normalize"} <= set(manifest)
    export(model, out, overwrite=True)  # re-export over its own directory replaces the copied modules
    assert (out / "1_Pooling" / "config.json").is_file()


def test_sentence_transformers_subfolder_layout(encoder_dir, tmp_path, capsys):
    """The older layout (transformer in 0_Transformer/, modules.json above it): `shear prune ROOT` loads the
    transformer from the subfolder and exports the modern layout (transformer at the top, its module path
    ""), pooling kept; AutoModel loads the export, and sentence-transformers (when installed) encodes with it."""
    import shutil

    from shear.cli import main

    root = tmp_path / "st-old"
    shutil.copytree(encoder_dir, root / "0_Transformer")
    (root / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    modules = [{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                "pooling_mode_mean_tokens": True}))
    assert main(["prune", str(root), "--ratio", "0.3", "--estimator", "magnitude_l2", "--structures", "mlp",
                 "--allocation", "uniform", "-o", str(tmp_path / "p")] + SMALL) == 0  # uniform MLP: stock BertModel
    out = tmp_path / "p" / "model"
    mods = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in mods] == ["", "1_Pooling"] and not (out / "0_Transformer").exists()
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 64}
    import transformers

    m, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pruned = load_model(str(out))
    with torch.no_grad():
        want = pruned(input_ids=IDS).last_hidden_state.mean(1)
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer  # a test extra
    st = SentenceTransformer(str(out), device="cpu")
    got = st.forward({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})["sentence_embedding"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
