"""Perplexity protocol: exact sliding-window NLL against hand loops and a uniform model."""
import math

import pytest
import torch
import torch.nn.functional as F

from shear.eval.perplexity import PPLResult, eval_text, load_eval_text, perplexity, window_plan


class Uniform(torch.nn.Module):
    """Predicts the uniform distribution over `vocab` tokens at every position."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.dummy


def test_non_overlapping_equals_hand_loop(tiny_llama):
    ids = torch.randint(0, 128, (300,))
    r = perplexity(tiny_llama, ids, seq_len=64, stride=64, batch_size=3)
    nll, n = 0.0, 0
    for s in range(0, 300 - 64 + 1, 64):  # 4 full windows, tail of 44 dropped
        x = ids[s: s + 64][None]
        logits = tiny_llama(input_ids=x).logits[0]
        nll += F.cross_entropy(logits[:-1].double(), x[0, 1:], reduction="sum").item()
        n += 63
    assert r.tokens == n == 4 * 63
    assert r.nll == pytest.approx(nll, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert r.protocol["windows"] == 4 and r.protocol["stride"] == 64


def test_overlapping_scores_each_token_once_like_hf_loop(tiny_llama):
    """stride < seq_len: the HF guide's loop (labels -100 on the context part) gives the same NLL."""
    ids = torch.randint(0, 128, (200,))
    L, S = 48, 16
    r = perplexity(tiny_llama, ids, seq_len=L, stride=S, batch_size=4)
    nll, n, prev_end = 0.0, 0, 0
    for s in range(0, 200 - L + 1, S):
        x = ids[s: s + L][None]
        labels = x.clone()
        trg = (s + L) - max(prev_end, s + 1)  # targets not yet scored (token 0 of the stream never is)
        labels[:, :-trg] = -100
        out = tiny_llama(input_ids=x, labels=labels)
        nll += out.loss.item() * trg
        n += trg
        prev_end = s + L
    assert r.tokens == n == (L - 1) + (len(range(0, 200 - L + 1, S)) - 1) * S
    assert r.nll == pytest.approx(nll, rel=1e-5)


def test_uniform_model_ppl_is_vocab_size():
    r = perplexity(Uniform(50), torch.randint(0, 50, (1000,)), seq_len=32, stride=16, batch_size=8)
    assert r.ppl == pytest.approx(50.0, rel=1e-6)  # log-softmax in fp32, sums in fp64
    assert r.tokens == 31 + (len(range(0, 1000 - 32 + 1, 16)) - 1) * 16


def test_max_windows_and_plan():
    assert window_plan(10, 4, 2) == [(0, 1), (2, 2), (4, 2), (6, 2)]
    assert window_plan(10, 4, 2, max_windows=2) == [(0, 1), (2, 2)]
    with pytest.raises(ValueError, match="stride"):
        window_plan(10, 4, 5)
    with pytest.raises(ValueError, match="fewer than one window"):
        window_plan(3, 4, 4)


def test_eval_text_and_local_file(tmp_path, tiny_llama):
    class CharTok:  # a character tokenizer: enough to check the text path
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % 128 for c in text]}

    text = "the quick brown fox jumps over the lazy dog. " * 10
    (tmp_path / "t.txt").write_text(text)
    assert load_eval_text(str(tmp_path / "t.txt")) == text
    r = eval_text(tiny_llama, CharTok(), text, seq_len=32, max_windows=3, protocol={"dataset": "t.txt"})
    ref = perplexity(tiny_llama, torch.tensor([ord(c) % 128 for c in text]), seq_len=32, max_windows=3)
    assert isinstance(r, PPLResult) and r.ppl == pytest.approx(ref.ppl) and r.tokens == 3 * 31
    assert "dataset=t.txt" in r.protocol_line() and "seq_len=32" in r.protocol_line()
