"""Inputs that gave silent wrong results or tracebacks now give one line naming the file and the fix:
shipped code needs the flag (tokenizers too, never a y/N prompt), non-finite weights, configs that
disagree with their weights, unreadable tokenizers and JSON, vocabularies that do not match."""
import io
import json
import shutil

import pytest
import torch

from shear.cli import main
from test_probes import EVAL_FAST, one_line_error, per_layer_dir  # noqa: F401 - a fixture


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# 4. consent covers config, model and tokenizer; transformers never asks on stdin --------------

@pytest.fixture
def custom_tokenizer_dir(tiny_lm_dir, tmp_path):
    """A model directory whose tokenizer is custom code (auto_map in tokenizer_config.json) that
    leaves a marker file when it runs."""
    d = _copy(tiny_lm_dir, tmp_path / "custom_tok")
    marker = tmp_path / "MARKER"
    (d / "tok_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "tok_custom.CustomTokenizer"]})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d, marker


def test_custom_tokenizer_needs_the_flag_not_a_prompt(custom_tokenizer_dir, monkeypatch, capsys):
    d, marker = custom_tokenizer_dir
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # `echo y | shear eval DIR`
    assert main(["eval", str(d), *EVAL_FAST]) == 2
    assert not marker.exists()
    err = one_line_error(capsys)
    assert f"{d} carries its own tokenizer code (auto_map in tokenizer_config.json); pass --trust-remote-code" in err
    assert main(["eval", str(d), *EVAL_FAST, "--trust-remote-code"]) == 0  # consent reaches the tokenizer
    assert marker.exists()


def test_per_layer_export_loads_without_a_prompt(per_layer_dir, monkeypatch):
    from shear.models import load_pretrained, load_tokenizer

    def no_prompt(*a, **k):
        raise AssertionError("transformers asked on stdin")

    monkeypatch.setattr("builtins.input", no_prompt)
    model, tok = load_pretrained(str(per_layer_dir), trust_remote_code=True)
    assert type(model).__name__.startswith("Shear") and len(tok) > 0
    assert len(load_tokenizer(str(per_layer_dir))) == len(tok)  # the tokenizer alone runs no code


def test_hub_refusal_of_custom_code_is_one_line():
    from shear.models import _load_error

    e = ValueError("The repository org/m contains custom code which must be executed to correctly load the model.\n"
                   "Please pass the argument `trust_remote_code=True` to allow custom code to be run.")
    assert str(_load_error("org/m", e)) == ("org/m carries its own code (auto_map); pass --trust-remote-code "
                                            "(or model.trust_remote_code: true) to run it")


# 10. export refuses a tokenizer it cannot read instead of exporting without one -----------------

@pytest.mark.parametrize("case", ["corrupt_json", "bad_tokenizer", "custom_code"])
def test_export_refuses_an_unreadable_tokenizer(case, tiny_lm_dir, custom_tokenizer_dir, tmp_path, capsys):
    d = custom_tokenizer_dir[0] if case == "custom_code" else _copy(tiny_lm_dir, tmp_path / "m")
    if case == "corrupt_json":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif case == "bad_tokenizer":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    named = {"corrupt_json": f"{d / 'tokenizer.json'}: not valid JSON (line 1 column 29)",
             "bad_tokenizer": f"{d}: its tokenizer files could not be read",
             "custom_code": "tokenizer_config.json); pass --trust-remote-code"}[case]
    assert main(["export", str(d), str(tmp_path / "out")]) == 2
    assert named in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_export_without_tokenizer_files_says_so(tiny_lm_dir, tmp_path, capsys):
    d = _copy(tiny_lm_dir, tmp_path / "m")
    for f in d.glob("*"):
        if "token" in f.name:
            f.unlink()
    assert main(["export", str(d), str(tmp_path / "out")]) == 0
    assert "has no tokenizer files: the export has none either" in capsys.readouterr().out
    assert not (tmp_path / "out" / "tokenizer.json").exists()


# 8. one nan weight: refused after loading, and non-finite calibration statistics name the module ---

@pytest.fixture
def nan_dir(tiny_lm_dir, tmp_path):
    """The tiny model with one nan in layer 0's up_proj."""
    from shear.models import load_pretrained

    model, tok = load_pretrained(str(tiny_lm_dir))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    return tmp_path / "nan"


NAN_WEIGHT = "weight model.layers.0.mlp.up_proj.weight: 1 of 6,144 values are not finite (nan/inf)"


@pytest.mark.parametrize("argv", [["prune", "--estimator", "flap"], ["prune", "--estimator", "wanda_sp"],
                                  ["sparsify", "--method", "magnitude", "--sparsity", "0.5"],
                                  ["sparsify", "--method", "sparsegpt", "--sparsity", "0.5"]])
def test_nan_weight_is_refused(argv, nan_dir, tmp_path, capsys):
    cmd = [argv[0], str(nan_dir), *argv[1:], "-o", str(tmp_path / "out")]
    assert main(cmd) == 2
    assert f"{nan_dir}: {NAN_WEIGHT}; the checkpoint is damaged" in one_line_error(capsys)
    assert not (tmp_path / "out" / "model").exists()


def test_nan_weight_is_refused_by_run(nan_dir, tmp_path, capsys):
    from test_probes import write_recipe

    r = write_recipe(tmp_path / "r.yaml", model={"path": str(nan_dir)}, train={"steps": 1})
    assert main(["run", r, "-o", str(tmp_path / "o")]) == 2
    assert NAN_WEIGHT in one_line_error(capsys)


def test_non_finite_calibration_statistics_name_the_module(nan_dir):
    """Weights loaded past the check (the library API): the statistics they poison are refused, not
    blamed on too few samples (SparseGPT) or turned into a plan (FLAP)."""
    from shear.importance.calibrate import collect_activation_stats
    from shear.models import load_model
    from shear.sparse.config import SparsifyConfig
    from shear.sparse.sequential import sparsify_

    model = load_model(str(nan_dir))
    ids = torch.randint(0, 256, (2, 16))
    with pytest.raises(FloatingPointError, match=r"importance: calibration statistics of the input of "
                                                 r"model.layers.0.mlp.down_proj: .* not finite \(nan/inf\); "
                                                 r"the activations reaching it overflow or are nan"):
        collect_activation_stats(model, ids, 2)
    with pytest.raises(FloatingPointError, match=r"sparsify: calibration statistics of the input of "
                                                 r"model.layers.0.mlp.down_proj: "):
        sparsify_(model, SparsifyConfig(method="sparsegpt", sparsity=0.5, n_samples=2, seq_len=16), ids)


# 9. analyze: transformers' defaults for absent size keys are said, and checked against the weights ---

def test_analyze_warns_when_size_keys_are_defaults(tmp_path, capsys, caplog):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                               "hidden_size": 64, "num_attention_heads": 4}))
    assert main(["analyze", str(d)]) == 0
    assert (f"{d / 'config.json'} has no num_hidden_layers, intermediate_size, vocab_size: transformers' defaults "
            "are assumed (num_hidden_layers=32, intermediate_size=11008, vocab_size=32000)") in caplog.text


def test_analyze_refuses_a_config_that_disagrees_with_the_weights(tiny_lm_dir, tmp_path, capsys, caplog):
    d = _copy(tiny_lm_dir, tmp_path / "m")
    assert main(["analyze", str(d)]) == 0 and "defaults" not in caplog.text  # a full config: no warning
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"], cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["analyze", str(d)]) == 2
    err = one_line_error(capsys)
    assert (f"{d / 'config.json'} disagrees with model.safetensors: lm_head.weight is [300, 64] there but "
            "[300, 4096] by the config") in err
    assert "config.json has no hidden_size, num_hidden_layers, so transformers' defaults were assumed; set them" in err
    cfg["hidden_size"] = 64  # only the layer count left to the default
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["analyze", str(d)]) == 2
    assert "gives 32 layers but the weights hold 2; config.json has no num_hidden_layers" in one_line_error(capsys)


# unclear list: one line naming the file and the fix --------------------------------------------

@pytest.fixture
def mamba_dir(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    d = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, state_size=4, num_hidden_layers=2)).save_pretrained(d)
    return d


def test_model_without_attention_blocks_is_refused(mamba_dir, tmp_path, capsys):
    for argv in (["analyze", str(mamba_dir)], ["prune", str(mamba_dir), "--estimator", "flap", "-o", str(tmp_path / "o")]):
        assert main(argv) == 2
        assert "mamba: no attention/MLP blocks to prune (state-space or other mixers)" in one_line_error(capsys)
    (mamba_dir / "model.safetensors").unlink()  # config only: the fallback needs weights, said as such
    assert main(["analyze", str(mamba_dir)]) == 2
    assert (f"{mamba_dir}: model_type 'mamba' is not one of the families analyzed from config.json alone"
            in one_line_error(capsys))


@pytest.fixture
def small_vocab_dir(tiny_lm_dir, tmp_path):
    """The tiny model's tokenizer (300 tokens) beside a model that embeds 100."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    d = tmp_path / "small"
    LlamaForCausalLM(tiny_llama_config(vocab_size=100)).save_pretrained(d)
    for f in tiny_lm_dir.glob("*token*"):
        shutil.copy(f, d / f.name)
    return d


def test_vocabulary_mismatch_is_named(small_vocab_dir, tiny_lm_dir, tmp_path, capsys):
    from test_probes import write_recipe

    assert main(["eval", str(small_vocab_dir), *EVAL_FAST]) == 2
    assert (f"{small_vocab_dir}: its tokenizer has 300 tokens but its model embeds 100; the tokenizer files are "
            "not this model's") in one_line_error(capsys)
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, data={"seq_len": 16},
                     train={"steps": 1, "batch_size": 2}, distill={"teacher": str(small_vocab_dir)})
    assert main(["run", r, "-o", str(tmp_path / "o")]) == 2
    assert (f"distill.teacher {small_vocab_dir}: its vocabulary has 100 entries but the model's has 300; KD needs "
            "a teacher with the model's tokenizer") in one_line_error(capsys)
    r = write_recipe(tmp_path / "r2.yaml", model={"path": str(small_vocab_dir), "tokenizer": str(tiny_lm_dir)},
                     train={"steps": 1})
    assert main(["run", r, "-o", str(tmp_path / "o2")]) == 2
    assert (f"{tiny_lm_dir}: the tokenizer has 300 tokens but the model {small_vocab_dir} embeds 100; give the "
            "model's own tokenizer (model.tokenizer)") in one_line_error(capsys)


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_invalid_json_names_the_file(file, tiny_lm_dir, tmp_path, capsys):
    d = _copy(tiny_lm_dir, tmp_path / "m")
    (d / file).write_text('{"model_type": "llama",\n oops}')
    for argv in (["eval", str(d), *EVAL_FAST], ["analyze", str(d)]):
        if file != "config.json" and argv[0] == "analyze":
            continue  # analyze reads no tokenizer
        assert main(argv) == 2
        assert (f"{d / file}: not valid JSON (line 2 column 2); restore the file (download or export the model "
                "again)") in one_line_error(capsys)


def test_eval_of_an_encoder_is_refused(tmp_path, capsys):
    from transformers import BertTokenizerFast

    from families import family_model

    d = tmp_path / "enc"
    family_model("bert").save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(d)
    assert main(["eval", str(d), *EVAL_FAST]) == 2
    assert (f"{d}: BertModel is an encoder, not a causal LM; perplexity, decode latency and lm-eval tasks need "
            "next-token logits") in one_line_error(capsys)
    assert main(["eval", str(d), "--no-ppl", "--no-speed"]) == 0  # parameters and MACs
    assert "params" in capsys.readouterr().out


def test_empty_text_file_is_named(tiny_lm_dir, tmp_path, capsys):
    from test_probes import write_recipe

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["prune", str(tiny_lm_dir), "--estimator", "flap", "--calib", str(empty), "-o", str(tmp_path / "p")]) == 2
    assert f"{empty}: no text (empty); give a file with text" in one_line_error(capsys)
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, data={"source": str(empty), "seq_len": 16},
                     train={"steps": 1})
    assert main(["run", r, "-o", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert f"{empty}: no text (empty)" in err and "validation_fraction" not in err


def test_eval_dataset_directory(tiny_lm_dir, tiny_text, tmp_path, capsys):
    from shear.eval.perplexity import load_eval_text

    d = tmp_path / "texts"
    d.mkdir()
    assert main(["eval", str(tiny_lm_dir), *EVAL_FAST, "--dataset", str(d)]) == 2
    assert f"eval.dataset: {d} is a directory without .txt/.jsonl/.json files" in one_line_error(capsys)
    (d / "a.txt").write_text(tiny_text[:5000])
    (d / "b.txt").write_text(tiny_text[5000:10000])
    assert load_eval_text(str(d)) == tiny_text[:5000] + "\n\n" + tiny_text[5000:10000]  # every document, as data.source
    assert main(["eval", str(tiny_lm_dir), *EVAL_FAST, "--dataset", str(d)]) == 0


def test_output_path_that_is_a_file(tiny_lm_dir, tmp_path, capsys):
    from test_probes import write_recipe

    f = tmp_path / "afile"
    f.write_text("mine")
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, train={"steps": 1}, output_dir=str(f))
    for argv, flag in ((["prune", str(tiny_lm_dir), "--estimator", "flap", "-o", str(f)], "-o"),
                       (["sparsify", str(tiny_lm_dir), "--method", "magnitude", "--sparsity", "0.5", "-o", str(f)], "-o"),
                       (["export", str(tiny_lm_dir), str(f / "sub")], "OUT"),
                       (["run", r, "-o", str(f)], "-o"), (["run", r], "output_dir")):
        assert main(argv) == 2
        target = f / "sub" if flag == "OUT" else f
        assert (f"{flag} {target}: {f} is a file, not a directory; give a directory path"
                in one_line_error(capsys)), argv
    assert f.read_text() == "mine"


def test_load_names_the_size_keys_a_config_lacks(tiny_lm_dir, tmp_path, capsys):
    d = _copy(tiny_lm_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(d), *EVAL_FAST]) == 2
    assert (f"{d / 'config.json'} disagrees with model.safetensors: lm_head.weight is [300, 64] there but "
            "[300, 4096] by the config; config.json has no hidden_size, so transformers' defaults were assumed; "
            "set them") in one_line_error(capsys)
    cfg.update(hidden_size=64, intermediate_size=128)  # present but wrong: transformers' refusal, in one line
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(d), *EVAL_FAST]) == 2
    assert f"{d}: config.json does not describe the weights (tensor shapes differ)" in capsys.readouterr().err


def test_full_disk_while_checkpointing_is_one_line(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """torch.save on a full disk raises "enforce fail at inline_container.cc"; the user gets one line naming
    the directory and the fix, the partial checkpoint is removed, the earlier complete one is kept."""
    import shutil as sh

    from shear.train import checkpoint
    from test_probes import write_recipe

    out = tmp_path / "run"
    r = write_recipe(tmp_path / "r.yaml", model={"path": str(tiny_lm_dir)}, data={"seq_len": 16},
                     train={"steps": 2, "batch_size": 2, "save_every": 1, "eval_every": 100, "warmup_steps": 0},
                     output_dir=str(out))
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 2:  # step 1 (optimizer, scheduler) is written; step 2 finds the disk full
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470")
        return real_save(obj, f, *a, **k)

    Usage = type(sh.disk_usage(tmp_path))
    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["run", r]) == 2
    line = one_line_error(capsys)
    assert "the disk is full while writing checkpoint step-2" in line and "step-1, is kept" in line, line
    ckpts = sorted(p.name for p in (out / "train" / "checkpoints").iterdir())
    assert ckpts == ["step-1"], ckpts
