"""Data layer: the embedded corpus, packing, local files, instruction masking, calibration."""
import json

import pytest
import torch

from shear.data.corpus import HELD_OUT, load_corpus, load_corpus_text
from shear.data.text import IGNORE_INDEX, DataConfig, build_datasets, calibration_ids, pack


@pytest.fixture(scope="module")
def tok():
    from shear.data.tokenizer import train_bpe

    return train_bpe([d["text"] for d in load_corpus("validation")], vocab_size=300)


def test_corpus_split_is_fixed_and_disjoint():
    train, val = load_corpus("train"), load_corpus("validation")
    assert {d["work"] for d in val} == set(HELD_OUT)
    assert not {d["work"] for d in train} & set(HELD_OUT)
    assert len(load_corpus_text("train")) + len(load_corpus_text("validation")) > 2_000_000
    with pytest.raises(ValueError, match="unknown corpus split"):
        load_corpus("test")


def test_pack_cuts_blocks_in_order():
    s = torch.arange(10)
    assert pack(s, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert pack(s, 3, max_blocks=1).shape == (1, 3)
    with pytest.raises(ValueError, match="fewer than one block"):
        pack(s, 11)


def test_tokenizer_round_trips(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Double, double toil and trouble;\nFire burn and cauldron bubble."
    ids = again(text)["input_ids"]
    assert ids == tok(text)["input_ids"] and again.decode(ids) == text


def test_local_text_files_split_seeded(tmp_path, tok):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    cfg = DataConfig(source=str(tmp_path), seq_len=16, validation_fraction=0.2, seed=1)
    a_train, a_val = build_datasets(cfg, tok)
    b_train, _ = build_datasets(cfg, tok)
    assert len(a_train) > 0 and len(a_val) > 0
    assert torch.equal(a_train.input_ids, b_train.input_ids)
    item = a_train[0]
    assert item["input_ids"].shape == (16,) and torch.equal(item["labels"], item["input_ids"])


def test_instruction_data_scores_responses_only(tmp_path, tok):
    rows = [{"prompt": f"say {i}", "response": f"word {i}"} for i in range(6)]
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(f), format="instruction", seq_len=48, validation_fraction=0.34)
    train, _ = build_datasets(cfg, tok)
    item = train[0]
    scored = item["labels"] != IGNORE_INDEX
    n_prompt = len(tok(cfg.prompt_template.format(prompt="say 0"), add_special_tokens=False)["input_ids"])
    assert not scored[:n_prompt].any(), "prompt tokens must not be scored"
    assert scored.any()
    # the scored tokens decode to a response followed by EOS
    resp = tok.decode(item["labels"][scored][:-1])
    assert resp.startswith("word ")


def test_missing_file_and_missing_field(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_datasets(DataConfig(source=str(tmp_path / "nope.txt")), tok)
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"q": i}) for i in range(4)))
    with pytest.raises(ValueError, match="lack field"):
        build_datasets(DataConfig(source=str(f), format="instruction"), tok)


def test_calibration_is_seeded(tok):
    a = calibration_ids(tok, 4, 32, seed=3, split="validation")
    b = calibration_ids(tok, 4, 32, seed=3, split="validation")
    c = calibration_ids(tok, 4, 32, seed=4, split="validation")
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


class _WordTok:
    """Word-level stand-in: word ``w<i>`` is token ``i + 1``; EOS is 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(w[1:]) + 1 for w in t.split()] for t in texts]}


def test_calibration_from_a_directory_uses_every_document(tmp_path):
    """Calibration from a user's directory draws from all of its files: none is held out as validation
    (5% of 20 files would be one). Each file holds a token no other file has; dense windows hit all."""
    from shear.data.text import calibration_scope, calibration_texts

    n = 20
    for i in range(n):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"w{i} " * 8)
    cfg = DataConfig(source=str(tmp_path))
    assert calibration_texts(cfg) == [f"w{i} " * 8 for i in range(n)]  # every file, in file order
    assert calibration_scope(str(tmp_path)) == "all documents"
    ids = calibration_ids(_WordTok(), n_samples=200, seq_len=16, seed=0, source=str(tmp_path))
    assert set(range(1, n + 1)) <= set(ids.unique().tolist())
    assert torch.equal(ids, calibration_ids(_WordTok(), n_samples=200, seq_len=16, seed=0, source=str(tmp_path)))
    # a run's data section keeps its validation share out: that is the run's held-out text
    train_only = calibration_ids(_WordTok(), n_samples=200, seq_len=16, seed=0, data=cfg)
    assert len(set(ids.unique().tolist()) - set(train_only.unique().tolist())) == 1


def test_calibration_keeps_the_named_corpora_held_out_split():
    """'shakespeare' and 'english' have fixed evaluation splits: calibration never draws from them."""
    from shear.data.text import calibration_texts

    texts = calibration_texts(DataConfig(source="shakespeare"))
    assert texts == [d["text"] for d in load_corpus("train")]
    assert not set(texts) & {d["text"] for d in load_corpus("validation")}
