"""`shear eval` end to end on a tiny Llama + a BPE tokenizer trained here, saved as a HF directory."""
import json

import pytest
import torch

from conftest import tiny_llama_config

VOCAB = 300
TEXT = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles."] * 20


def make_model_dir(path, seed=0, **over):
    """Save a tiny GQA Llama and a byte-level BPE tokenizer (vocab 300) to `path`; return `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size=VOCAB, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, **over)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (make_model_dir(root / "dense"),
            make_model_dir(root / "small", seed=1, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1))


def test_eval_command_vs_table_and_json(model_dirs, tmp_path, capsys):
    from shear.cli import main
    from shear.cli.eval import load_model
    from shear.eval.perplexity import eval_text, load_eval_text

    dense, small = model_dirs
    out = tmp_path / "m.json"
    rc = main(["eval", str(small), "--vs", str(dense), "--seq-len", "32", "--max-windows", "3",
               "--prefill-tokens", "8", "--decode-tokens", "3", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PPL protocol: dataset=shakespeare, split=validation, seq_len=32, stride=32, windows=3" in printed
    assert "model / original" in printed and "decode tok/s" in printed
    res = json.loads(out.read_text())["models"]
    assert list(res) == ["original", "model"]
    # the small model: 2 query heads x 16, 1 KV head, MLP 48; counted from its modules
    h = 64
    assert res["model"]["linear_macs_per_token"] == 2 * (h * 32 + 2 * h * 16 + 32 * h + 3 * h * 48) + h * VOCAB
    assert res["model"]["params"] < res["original"]["params"]
    assert res["model"]["ppl_protocol"]["tokens_scored"] == 3 * 31
    # the printed PPL is the library's number on the reloaded model
    m, tok = load_model(str(small))
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    ref = eval_text(m, tok, load_eval_text("shakespeare", "validation"), seq_len=32, max_windows=3)
    assert res["model"]["ppl"] == pytest.approx(ref.ppl, rel=1e-9)
    ratio = f"{res['model']['ppl'] / res['original']['ppl']:.3f}x"
    assert ratio in printed


def test_eval_command_local_text_no_speed(model_dirs, tmp_path, capsys):
    from shear.cli import main

    f = tmp_path / "held.txt"
    f.write_text(" ".join(TEXT))
    rc = main(["eval", str(model_dirs[0]), "--dataset", str(f), "--seq-len", "16", "--stride", "8", "--no-speed"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"dataset={f}, split=validation, seq_len=16, stride=8" in printed
    assert "prefill tok/s" not in printed


def test_eval_command_rejects_bad_protocol(model_dirs, capsys):
    from shear.cli import main

    rc = main(["eval", str(model_dirs[0]), "--seq-len", "16", "--stride", "32"])
    assert rc == 2 and "stride" in capsys.readouterr().err
    assert main(["eval", str(model_dirs[0].parent / "missing")]) == 2


def test_eval_command_tasks_without_lm_eval(model_dirs, monkeypatch, capsys):
    from shear.cli import main
    from shear.eval import lm_eval_bridge

    monkeypatch.setattr(lm_eval_bridge, "lm_eval_available", lambda: False)
    assert main(["eval", str(model_dirs[0]), "--tasks", "piqa"]) == 2
    assert "pip install 'shear[eval]'" in capsys.readouterr().err


def test_compare_table_ratios_vs_first_row():
    from rich.console import Console

    from shear.eval.report import compare_table

    rows = {"dense": {"params": 1000, "ppl": 10.0}, "pruned": {"params": 500, "ppl": 20.0},
            "recovered": {"params": 500, "ppl": 12.0}}
    con = Console(width=200, record=True)
    con.print(compare_table(rows))
    text = con.export_text()
    assert "pruned / dense" in text and "recovered / dense" in text
    assert "0.500x" in text and "2.000x" in text and "1.200x" in text
