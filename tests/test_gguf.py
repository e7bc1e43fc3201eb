"""GGUF -> Hugging Face directory (shear/gguf.py, ``shear convert``) on a tiny Llama GGUF written here.

The file is written with the ``gguf`` package's writer, under llama.cpp's tensor and metadata names,
with a tiny byte-level BPE vocabulary. transformers' own GGUF loader is the reference: llama.cpp
permutes q/k rows for its rotary layout and the loader undoes that, so the converted model is
compared with what ``from_pretrained(dir, gguf_file=...)`` returns, not with the arrays written."""
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

H, I, L, NH, NKV, D = 64, 96, 2, 4, 2, 16
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]


def write_tiny_gguf(path, tied: bool = False, seed: int = 0):
    """A 2-layer GQA Llama (4 query heads, 2 KV heads) in F32 with a 261-token byte-level BPE vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    v = len(tokens)
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (v - 1) + [3])  # the last one is CONTROL
    w.add_token_merges(MERGES)
    w.add_bos_token_id(v - 1)
    w.add_eos_token_id(v - 1)
    w.add_tensor("token_embd.weight", r(v, H))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_q.weight", r(NH * D, H))
        w.add_tensor(p + "attn_k.weight", r(NKV * D, H))
        w.add_tensor(p + "attn_v.weight", r(NKV * D, H))
        w.add_tensor(p + "attn_output.weight", r(H, NH * D))
        w.add_tensor(p + "ffn_gate.weight", r(I, H))
        w.add_tensor(p + "ffn_up.weight", r(I, H))
        w.add_tensor(p + "ffn_down.weight", r(H, I))
        w.add_tensor(p + "attn_norm.weight", 1 + r(H))
        w.add_tensor(p + "ffn_norm.weight", 1 + r(H))
    w.add_tensor("output_norm.weight", 1 + r(H))
    if not tied:
        w.add_tensor("output.weight", r(v, H))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_src")
    write_tiny_gguf(d / "tiny.gguf")
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_convert_matches_the_gguf_loader(gguf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shear.gguf import convert_gguf

    out = convert_gguf(gguf_dir, tmp_path / "hf")
    assert out == tmp_path / "hf"
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="tiny.gguf")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (L, NH, NKV)
    ids = torch.randint(0, 261, (2, 12))
    a, b = _logits(ref, ids), _logits(model, ids)
    assert torch.equal(a, b)
    # every weight is the loader's, none freshly initialized
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    tok = AutoTokenizer.from_pretrained(str(out))
    ref_tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="tiny.gguf")
    text = "the cat in the hat"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert 257 in tok(text)["input_ids"]  # the merge "h e" applies: a merged token, not only bytes
    assert tok.eos_token == "<|endoftext|>"
    marker = json.loads((out / "shear_gguf.json").read_text())
    assert marker["dtype"] == "fp32" and marker["source"].endswith("tiny.gguf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]  # no temporary left behind


def test_convert_a_file_path_and_bf16(gguf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from shear.gguf import convert_gguf

    out = convert_gguf(gguf_dir / "tiny.gguf", tmp_path / "bf", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(gguf_dir, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_convert_tied_embeddings(tmp_path):
    """A file without output.weight ties lm_head to the embeddings; the converted model does too."""
    from transformers import AutoModelForCausalLM

    from shear.gguf import convert_gguf

    src = tmp_path / "src"
    src.mkdir()
    write_tiny_gguf(src / "tied.gguf", tied=True, seed=1)
    ref = AutoModelForCausalLM.from_pretrained(str(src), gguf_file="tied.gguf")
    out = convert_gguf(src, tmp_path / "hf")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.randint(0, 261, (1, 9))
    assert torch.equal(_logits(ref, ids), _logits(model, ids))


def test_overwrite_rules(gguf_dir, tmp_path):
    from shear.gguf import convert_gguf

    out = convert_gguf(gguf_dir, tmp_path / "hf")
    with pytest.raises(FileExistsError, match="exists"):
        convert_gguf(gguf_dir, out)
    # a directory convert wrote may be replaced
    (out / "stale.txt").write_text("old")
    assert convert_gguf(gguf_dir, out, overwrite=True) == out
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    # a directory convert did not write is never replaced, even with overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by a GGUF conversion"):
        convert_gguf(gguf_dir, mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_find_gguf(tmp_path, gguf_dir):
    from shear.gguf import convert_gguf, find_gguf

    assert find_gguf(gguf_dir) == (gguf_dir, "tiny.gguf")
    assert find_gguf(gguf_dir / "tiny.gguf") == (gguf_dir, "tiny.gguf")
    nested = tmp_path / "wheel"
    (nested / "pkg").mkdir(parents=True)
    (nested / "pkg" / "m.gguf").write_bytes(b"GGUF")
    assert find_gguf(nested) == (nested / "pkg", "m.gguf")  # one level down, as in an unpacked wheel
    (nested / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files") as e:
        find_gguf(nested)
    assert "m.gguf" in str(e.value) and "other.gguf" in str(e.value)
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files"):
        convert_gguf(nested, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds 0 \.gguf files"):
        find_gguf(empty)
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        find_gguf(txt)
    with pytest.raises(FileNotFoundError):
        find_gguf(tmp_path / "missing")


def test_cli_convert(gguf_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from shear.cli import main

    out = tmp_path / "cli_out"
    assert main(["convert", str(gguf_dir), str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    assert (out / "shear_gguf.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))
    # a second run without --overwrite is an error (exit code != 0), and with it succeeds
    assert main(["convert", str(gguf_dir), str(out)]) != 0
    assert main(["convert", str(gguf_dir), str(out), "--overwrite", "--dtype", "fp16"]) == 0
    assert json.loads((out / "shear_gguf.json").read_text())["dtype"] == "fp16"
