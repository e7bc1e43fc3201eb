"""Loss math of the trainer, pure tensor functions (no hooks, no I/O).

Shapes: N = scored tokens (flattened over batch and sequence), V = vocabulary, H = hidden size.
Every loss here returns a SUM over tokens; the trainer divides by the global count of scored tokens,
so a batch split across processes or micro-batches gives the same gradient as one big batch.

Distillation follows Hinton et al. 2015 (KL at temperature T, scaled by T^2) and GKD
(Agarwal et al. 2024) for the generalized Jensen-Shannon divergence; the chunked evaluation follows
the idea of torchtune's ForwardKLWithChunkedOutputLoss but also recomputes each chunk's logits in
backward, so at most one chunk of student logits is alive at any time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between teacher and student next-token distributions, in fp32.

    s_logits, t_logits: [N, V] -> [N]. With p = softmax(t/T), q = softmax(s/T):
      forward_kl: T^2 * KL(p || q) = T^2 * sum p (log p - log q)
      reverse_kl: T^2 * KL(q || p)
      jsd:        T^2 * (beta * KL(p || m) + (1 - beta) * KL(q || m)),  m = beta p + (1 - beta) q
    Identical inputs give exactly 0.
    """
    q_log = F.log_softmax(s_logits.float() / temperature, dim=-1)
    p_log = F.log_softmax(t_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = (p_log.exp() * (p_log - q_log)).sum(-1)
    elif kind == "reverse_kl":
        d = (q_log.exp() * (q_log - p_log)).sum(-1)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd_beta: must be in (0, 1), got {beta}")
        # log m in a form that is exactly log p when p == q (so self-distillation gives exactly 0):
        # m = q (1 + beta (p/q - 1)) where p <= q, m = p (1 + (1-beta)(q/p - 1)) elsewhere.
        diff = p_log - q_log
        m_log = torch.where(diff <= 0, q_log + torch.log1p(beta * torch.expm1(diff.clamp(max=0))),
                            p_log + torch.log1p((1.0 - beta) * torch.expm1((-diff).clamp(max=0))))
        d = beta * (p_log.exp() * (p_log - m_log)).sum(-1) + (1.0 - beta) * (q_log.exp() * (q_log - m_log)).sum(-1)
    else:
        raise ValueError(f"kd_loss: unknown divergence {kind!r} (forward_kl, reverse_kl, jsd)")
    return d * (temperature ** 2)


def plain_logit_losses(s_logits: torch.Tensor, t_logits: torch.Tensor | None, targets: torch.Tensor,
                       kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5):
    """Reference (unchunked) version: s_logits, t_logits [N, V], targets [N] -> (ce_sum, kd_sum)."""
    ce = F.cross_entropy(s_logits.float(), targets, reduction="sum")
    kd = s_logits.new_zeros((), dtype=torch.float32)
    if t_logits is not None:
        kd = token_divergence(s_logits, t_logits, kind, temperature, beta).sum()
    return ce, kd


def chunked_logit_losses(h_s: torch.Tensor, head_s: Callable, h_t: torch.Tensor | None,
                         head_t: Callable | None, targets: torch.Tensor, *, chunk_size: int = 1024,
                         kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                         need_ce: bool = True, need_kd: bool = True):
    """CE and KD sums from final hidden states, chunk by chunk over tokens, in fp32.

    h_s: [N, Hs] student final hidden states; head_s: [n, Hs] -> [n, V] (the student's lm_head);
    h_t: [N, Ht] teacher final hidden states; head_t: teacher lm_head (run without grad);
    targets: [N] next-token ids. Returns (ce_sum, kd_sum) as fp32 scalars, equal to
    plain_logit_losses on the full logits. Each chunk runs under activation checkpointing, so its
    [chunk, V] logits are recomputed in backward instead of kept.
    """
    zero = h_s.new_zeros((), dtype=torch.float32)
    ce_sum, kd_sum = zero, zero
    use_kd = need_kd and h_t is not None

    def chunk_loss(hs, ht, tg):
        s_logits = head_s(hs).float()
        ce = F.cross_entropy(s_logits, tg, reduction="sum") if need_ce else s_logits.new_zeros(())
        kd = s_logits.new_zeros(())
        if use_kd:
            with torch.no_grad():
                t_logits = head_t(ht).float()
            kd = token_divergence(s_logits, t_logits, kind, temperature, beta).sum()
        return ce, kd

    for start in range(0, h_s.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        ht = h_t[sl] if use_kd else None
        if torch.is_grad_enabled() and h_s.requires_grad:
            ce, kd = checkpoint(chunk_loss, h_s[sl], ht, targets[sl], use_reentrant=False)
        else:
            ce, kd = chunk_loss(h_s[sl], ht, targets[sl])
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    return ce_sum, kd_sum


def hidden_state_loss(h_s: torch.Tensor, h_t: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Sum over tokens of the hidden-state distance; h_s (already projected) and h_t: [N, H] -> scalar.

    mse: mean over H of (h_s - h_t)^2; cosine: 1 - cos(h_s, h_t) (Minitron's depth-pruning extra loss).
    """
    h_s, h_t = h_s.float(), h_t.float()
    if kind == "mse":
        return (h_s - h_t).pow(2).mean(-1).sum()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(h_s, h_t, dim=-1)).sum()
    raise ValueError(f"hidden_loss: unknown kind {kind!r} (mse, cosine)")


def resolve_layer_map(n_student: int, n_teacher: int, layer_map) -> list[tuple[int, int]]:
    """Pairs (student output index, teacher output index), 1-based (hidden_states[i] = output of layer i).

    'auto': student layer i -> teacher layer round(i * n_teacher / n_student), so the last layers meet;
    None: last layer only; a list: entry i-1 is the teacher layer matched by student layer i.
    """
    if layer_map is None:
        return [(n_student, n_teacher)]
    if layer_map == "auto":
        return [(i, max(1, round(i * n_teacher / n_student))) for i in range(1, n_student + 1)]
    if len(layer_map) != n_student:
        raise ValueError(f"layer_map: has {len(layer_map)} entries, the student has {n_student} layers")
    if max(layer_map) > n_teacher:
        raise ValueError(f"layer_map: teacher index {max(layer_map)} > teacher layers ({n_teacher})")
    return [(i + 1, t) for i, t in enumerate(layer_map)]


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' mean pooling: h [B, L, H], mask [B, L] (1 = token) -> [B, H]."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embedding_loss(e_s: torch.Tensor, e_t: torch.Tensor, kind: str = "cosine",
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over sentences of the embedding distance; e_s, e_t: [B, H], weights: [B] (default 1) -> scalar.

    cosine: 1 - cos(e_s, e_t); mse: mean over H of (e_s - e_t)^2. Identical inputs give 0 (cosine: up to rounding).
    """
    e_s, e_t = e_s.float(), e_t.float()
    if kind == "cosine":
        d = 1.0 - F.cosine_similarity(e_s, e_t, dim=-1)
    elif kind == "mse":
        d = (e_s - e_t).pow(2).mean(-1)
    else:
        raise ValueError(f"embedding_loss: unknown kind {kind!r} (cosine, mse)")
    return (d * weights.float()).sum() if weights is not None else d.sum()
