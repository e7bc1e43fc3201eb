"""The trained module: a student causal LM plus (optional) hidden-state projections, whose forward
returns loss SUMS. Wrapping the whole loss in one forward lets DDP / DeepSpeed see every use of the
parameters (the chunked lm_head calls included)."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DistillConfig
from .losses import chunked_logit_losses, embedding_loss, hidden_state_loss, mean_pool, resolve_layer_map


def _base(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _n_layers(model: nn.Module) -> int:
    return int(_base(model).config.num_hidden_layers)


def _hidden_size(model: nn.Module) -> int:
    return int(_base(model).config.hidden_size)


def is_encoder(model: nn.Module) -> bool:
    """True for a model without an LM head (BertModel and kin): no CE, no logit KD, embedding distillation."""
    return _base(model).get_output_embeddings() is None


def attention_mask_for(model: nn.Module, labels: torch.Tensor) -> torch.Tensor | None:
    """Encoders attend to the labelled tokens only (labels -100 = padding); causal LMs get no mask (None),
    since their -100 labels may mark prompt tokens that are still attended to."""
    return (labels != -100).long() if is_encoder(model) else None


def supports_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


class LossModule(nn.Module):
    """forward(input_ids [B, L], labels [B, L], teacher_hidden) -> dict of fp32 scalar sums.

    Labels follow HF: position t predicts labels[t + 1]; -100 is not scored. Keys: loss (weighted
    total), ce, kd, hidden, embedding, tokens (scored-token count, a float tensor).

    A student without an LM head (an encoder) is distilled on mean-pooled sentence embeddings (and optional
    hidden states) only; each sentence's embedding loss is weighted by its scored-token count, so the trainer's
    division by the global token count gives a token-weighted mean. Its ce_only forward (validation PPL)
    returns ce = NaN: an encoder has no next-token loss.

    ``shearing`` (shear.shearing.ShearingTerm, learned masks): a submodule, so DDP and checkpoints see its
    masks and multipliers; a training forward adds key ``lagrangian``, the constraint term, NOT a token sum
    (the trainer adds it once per optimizer step).
    """

    def __init__(self, model: nn.Module, distill: DistillConfig | None = None, teacher: nn.Module | None = None,
                 shearing: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.shearing = shearing
        self.distill = distill
        self._teacher = [teacher]  # a list: not registered, so neither DDP nor state_dict sees it
        self.pairs: list[tuple[int, int]] = []
        self.proj = None
        if distill is not None and teacher is not None and distill.hidden_weight > 0:
            self.pairs = resolve_layer_map(_n_layers(model), _n_layers(teacher), distill.layer_map)
            hs, ht = _hidden_size(model), _hidden_size(teacher)
            self.proj = nn.ModuleList(nn.Linear(hs, ht, bias=False) for _ in self.pairs)
            for p in self.proj:  # start as the identity (or its rectangular cut)
                nn.init.eye_(p.weight)
        self.fast_head = supports_logits_to_keep(model)
        self.encoder = is_encoder(model)
        if self.encoder and distill is not None and distill.embedding_weight == 0 and distill.hidden_weight == 0:
            raise ValueError("distill.embedding_weight: the student has no LM head (an encoder), so CE and logit KD "
                             "do not apply; set distill.embedding_weight and/or distill.hidden_weight > 0")

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, teacher_hidden=None, ce_only: bool = False):
        out = self._losses(input_ids, labels, teacher_hidden, ce_only)
        if self.shearing is not None and not ce_only:
            out["lagrangian"] = self.shearing()
        return out

    def _losses(self, input_ids, labels, teacher_hidden, ce_only):
        if self.encoder and (self.distill is None or ce_only):
            tokens = (labels[:, 1:] != -100).sum().float()
            nan = tokens.new_full((), float("nan"))
            return {"loss": nan, "ce": nan, "kd": nan, "hidden": nan, "embedding": nan, "tokens": tokens}
        if self.distill is None or ce_only:
            return self._ce(input_ids, labels)
        if self.encoder:
            return self._distill_encoder(input_ids, labels, teacher_hidden)
        return self._distill(input_ids, labels, teacher_hidden)

    def _ce(self, input_ids, labels):
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        tgt = labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.flatten(), ignore_index=-100, reduction="sum")
        zero = ce.new_zeros(())
        return {"loss": ce, "ce": ce, "kd": zero, "hidden": zero, "embedding": zero, "tokens": (tgt != -100).sum().float()}

    def _distill(self, input_ids, labels, teacher_hidden):
        d = self.distill
        kw = {"logits_to_keep": input_ids.new_zeros(0)} if self.fast_head else {}
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True, **kw)
        mask = labels[:, 1:] != -100
        tgt = labels[:, 1:][mask]
        pick = lambda h: h[:, :-1][mask]  # [B, L, H] -> [N, H] at scored positions
        t_final = pick(teacher_hidden[-1]) if teacher_hidden is not None else None
        t_head = self.teacher.get_output_embeddings() if self.teacher is not None else None
        if self.fast_head:  # logits are made chunk by chunk from the final hidden states
            h_s, head_s = pick(out.hidden_states[-1]), _base(self.model).get_output_embeddings()
            h_t, head_t = t_final, t_head
        else:  # a model without logits_to_keep: its full logits, the loss still per chunk in fp32
            h_s, head_s = pick(out.logits), nn.Identity()
            h_t, head_t = (pick(t_head(teacher_hidden[-1])) if t_head is not None else None), nn.Identity()
        ce, kd = chunked_logit_losses(h_s, head_s, h_t, head_t, tgt, chunk_size=d.chunk_size, kind=d.kd_loss,
                                      temperature=d.temperature, beta=d.jsd_beta,
                                      need_ce=d.ce_weight > 0, need_kd=d.kd_weight > 0)
        hid = ce.new_zeros(())
        if self.proj is not None:
            for proj, (i, j) in zip(self.proj, self.pairs):
                hid = hid + hidden_state_loss(proj(pick(out.hidden_states[i])), pick(teacher_hidden[j]), d.hidden_loss)
        loss = d.ce_weight * ce + d.kd_weight * kd + d.hidden_weight * hid
        return {"loss": loss, "ce": ce, "kd": kd, "hidden": hid, "embedding": ce.new_zeros(()), "tokens": mask.sum().float()}

    def _distill_encoder(self, input_ids, labels, teacher_hidden):
        """Embedding (+ hidden-state) distillation of an encoder; teacher_hidden from the same attention mask."""
        d = self.distill
        mask = labels != -100  # [B, L]
        out = self.model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
        weights = mask[:, 1:].sum(1)  # [B] scored tokens per sentence, as the trainer counts them
        emb = embedding_loss(mean_pool(out.hidden_states[-1], mask), mean_pool(teacher_hidden[-1], mask),
                             d.embedding_loss, weights)
        hid = emb.new_zeros(())
        if self.proj is not None:
            for proj, (i, j) in zip(self.proj, self.pairs):
                hid = hid + hidden_state_loss(proj(out.hidden_states[i][mask]), teacher_hidden[j][mask], d.hidden_loss)
        zero = emb.new_zeros(())
        loss = d.embedding_weight * emb + d.hidden_weight * hid
        return {"loss": loss, "ce": zero, "kd": zero, "hidden": hid, "embedding": emb,
                "tokens": mask[:, 1:].sum().float()}


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          every_layer: bool = True):
    """Teacher forward without logits: a tuple of [B, L, Ht] (index 0 = embeddings, -1 = final norm).
    attention_mask [B, L]: passed only when given (encoders, see attention_mask_for). ``every_layer`` False:
    only what logit / embedding KD reads, ``(final hidden states,)`` from the base model (no tuple of every
    layer's states kept alive through the step: 33 x [B, L, H] for an 8B teacher)."""
    kw = {"attention_mask": attention_mask} if attention_mask is not None else {"use_cache": False}
    if not every_layer:
        return (teacher.base_model(input_ids=input_ids, **kw).last_hidden_state,)
    if attention_mask is None and supports_logits_to_keep(teacher):
        kw["logits_to_keep"] = input_ids.new_zeros(0)
    return teacher(input_ids=input_ids, output_hidden_states=True, **kw).hidden_states
