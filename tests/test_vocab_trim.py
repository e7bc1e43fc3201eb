"""Vocabulary trimming (shear.prune.vocab): a WordPiece BERT keeps only the tokens a text uses.

Invariants: text that uses only kept tokens gives the same tokens and identical hidden states (and MLM
logits on the kept rows) before and after; a word that used a removed token re-segments into kept pieces,
a character nothing kept covers becomes [UNK]; the export reloads in a fresh process with AutoTokenizer +
AutoModel and reproduces the trimmed model; non-WordPiece tokenizers are refused.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from families import family_model
from shear.prune.export import export
from shear.prune.vocab import VocabConfig, select_vocab, token_counts, trim_vocab_

WORDS = ["the", "cat", "cats", "dog", "sat", "on", "mat", "ran", "zoo"]
KEEP_TEXT = ["the cat sat on the mat.", "the dog ran."]  # never uses "cats" or "zoo", nor z/q/x


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer():
    """A 128-entry WordPiece vocabulary: specials, some words, letters and their ## forms, punctuation."""
    from transformers import BertTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]
    vocab += list(".,!?")
    vocab += [f"[unused{i}]" for i in range(1, 128 - len(vocab) + 1)]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})


def _hidden(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state, enc


def _trimmed(keep_ascii=False):
    tok = _tokenizer()
    model = family_model("bert")
    keep = select_vocab(tok, token_counts(tok, KEEP_TEXT), VocabConfig(keep_ascii=keep_ascii))
    new_model = copy.deepcopy(model)
    new_tok = trim_vocab_(new_model, tok, keep)
    return model, tok, new_model, new_tok, keep


def test_kept_text_is_unchanged_and_model_shrinks():
    model, tok, new_model, new_tok, keep = _trimmed()
    kept_tokens = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "ran", "."}
    assert set(new_tok.convert_ids_to_tokens(range(len(new_tok)))) == kept_tokens
    assert new_model.get_input_embeddings().weight.shape == (len(kept_tokens), 64)
    assert new_model.config.vocab_size == len(new_tok) == len(kept_tokens)
    assert new_model.config.pad_token_id == new_tok.pad_token_id == 0
    texts = ["the dog sat on the cat.", "the mat ran."]
    h0, e0 = _hidden(model, tok, texts)
    h1, e1 = _hidden(new_model, new_tok, texts)
    assert [tok.convert_ids_to_tokens(x) for x in e0["input_ids"]] == [new_tok.convert_ids_to_tokens(x) for x in e1["input_ids"]]
    assert not torch.equal(e0["input_ids"], e1["input_ids"])  # renumbered: a stale tokenizer would be wrong
    torch.testing.assert_close(h1, h0, atol=0, rtol=0)


def test_removed_tokens_resegment_or_become_unk():
    _, tok, _, new_tok, _ = _trimmed(keep_ascii=True)
    # "cats" is a token of its own before; after, greedy longest match over the kept pieces
    assert tok.tokenize("cats") == ["cats"]
    assert new_tok.tokenize("cats") == ["cat", "##s"]
    # without the ASCII characters kept, a word no kept piece covers is one [UNK], never another token's id
    _, _, _, bare_tok, _ = _trimmed(keep_ascii=False)
    assert bare_tok.tokenize("the zoo") == ["the", "[UNK]"]
    assert bare_tok("the zoo")["input_ids"][2] == bare_tok.unk_token_id


def test_masked_lm_head_follows():
    import transformers

    from families import family_config

    tok = _tokenizer()
    model = transformers.BertForMaskedLM(family_config("bert")).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # not zero: a bias left unsliced would show
    keep = select_vocab(tok, token_counts(tok, KEEP_TEXT), VocabConfig(keep_ascii=False))
    new_model = copy.deepcopy(model)
    new_tok = trim_vocab_(new_model, tok, keep)
    assert new_model.cls.predictions.decoder.weight is new_model.bert.embeddings.word_embeddings.weight  # still tied
    enc0, enc1 = tok(KEEP_TEXT[:1], return_tensors="pt"), new_tok(KEEP_TEXT[:1], return_tensors="pt")
    with torch.no_grad():
        l0, l1 = model(**enc0).logits, new_model(**enc1).logits
    torch.testing.assert_close(l1, l0[..., keep], atol=0, rtol=0)


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModel, AutoTokenizer
    d, texts = sys.argv[1], json.loads(sys.argv[2])
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    print(json.dumps({"ids": enc["input_ids"].tolist(), "h": h.tolist()}))
""")


def test_export_reloads_in_a_fresh_process(tmp_path):
    _, _, new_model, new_tok, _ = _trimmed(keep_ascii=True)
    out = export(new_model, tmp_path / "out", tokenizer=new_tok)
    texts = ["the cat sat on the mat.", "cats at the zoo"]  # kept tokens, and words that re-segment
    h, enc = _hidden(new_model, new_tok, texts)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(texts)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ids"] == enc["input_ids"].tolist()
    torch.testing.assert_close(torch.tensor(got["h"]), h, atol=1e-6, rtol=0)


def test_refusals():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])))
    with pytest.raises(ValueError, match="WordPiece"):
        select_vocab(bpe, torch.ones(3, dtype=torch.long))
    tok = _tokenizer()
    with pytest.raises(ValueError, match="special token ids"):
        trim_vocab_(family_model("bert"), tok, torch.tensor([6, 7, 8]))
    with pytest.raises(ValueError, match="min_count"):
        VocabConfig(min_count=0)
