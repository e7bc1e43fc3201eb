"""Distillation loss math: hand-checked divergences, self-distillation is zero, chunked == plain."""
import math

import pytest
import torch

from shear.train.losses import (chunked_logit_losses, hidden_state_loss, plain_logit_losses,
                                resolve_layer_map, token_divergence)


def _logits_of(probs):
    return torch.tensor(probs).log().unsqueeze(0)


def test_divergences_match_hand_computation():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]  # teacher p, student q
    t, s = _logits_of(p), _logits_of(q)
    kl_pq = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # = 0.25 ln 2
    kl_qp = 0.25 * math.log(0.5) + 0.5 * math.log(2)
    assert token_divergence(s, t, "forward_kl").item() == pytest.approx(kl_pq, abs=1e-6)
    assert token_divergence(s, t, "reverse_kl").item() == pytest.approx(kl_qp, abs=1e-6)
    beta = 0.3
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))
    want = beta * kl(p, m) + (1 - beta) * kl(q, m)
    assert token_divergence(s, t, "jsd", beta=beta).item() == pytest.approx(want, abs=1e-6)


def test_temperature_scales_logits_and_multiplies_by_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    want = 4.0 * token_divergence(s / 2.0, t / 2.0, "forward_kl")
    torch.testing.assert_close(token_divergence(s, t, "forward_kl", temperature=2.0), want)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_self_distillation_is_zero(kind):
    z = torch.randn(6, 11) * 3
    assert token_divergence(z, z.clone(), kind).abs().max().item() == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_plain_values_and_grads(kind):
    torch.manual_seed(0)
    N, Hs, Ht, V = 37, 8, 12, 19
    head_s, head_t = torch.nn.Linear(Hs, V), torch.nn.Linear(Ht, V)
    h_s = torch.randn(N, Hs, requires_grad=True)
    h_t = torch.randn(N, Ht)
    tgt = torch.randint(0, V, (N,))
    ce_p, kd_p = plain_logit_losses(head_s(h_s), head_t(h_t).detach(), tgt, kind, temperature=1.7, beta=0.4)
    g_plain = torch.autograd.grad(ce_p + 2 * kd_p, [h_s, head_s.weight])
    ce_c, kd_c = chunked_logit_losses(h_s, head_s, h_t, head_t, tgt, chunk_size=5, kind=kind,
                                      temperature=1.7, beta=0.4)
    g_chunk = torch.autograd.grad(ce_c + 2 * kd_c, [h_s, head_s.weight])
    torch.testing.assert_close(ce_c, ce_p)
    torch.testing.assert_close(kd_c, kd_p)
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b)
    assert head_t.weight.grad is None  # the teacher gets no gradient


def test_hidden_losses_hand_checked():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert hidden_state_loss(a, b, "mse").item() == pytest.approx(0 + (4 + 4) / 2)
    assert hidden_state_loss(a, b, "cosine").item() == pytest.approx(0 + 1.0)


def test_layer_map():
    assert resolve_layer_map(2, 4, "auto") == [(1, 2), (2, 4)]
    assert resolve_layer_map(3, 3, None) == [(3, 3)]
    assert resolve_layer_map(2, 4, [1, 4]) == [(1, 1), (2, 4)]
    with pytest.raises(ValueError, match="layer_map"):
        resolve_layer_map(2, 4, [1, 2, 3])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text", "phi3", "gpt_neox", "bert"])
def test_teacher_final_states_alone_equal_the_last_of_every_layer(family):
    """Logit / embedding KD reads only the teacher's final hidden states: taken from the base model alone they
    are the last of the tuple of every layer's (the final norm applied), bit for bit."""
    from families import family_model
    from shear.train.student import teacher_hidden_states

    torch.manual_seed(0)
    model = family_model(family)
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids) if family == "bert" else None
    every = teacher_hidden_states(model, ids, mask)
    final = teacher_hidden_states(model, ids, mask, every_layer=False)
    assert len(final) == 1 and len(every) > 2
    assert torch.equal(final[-1], every[-1])
