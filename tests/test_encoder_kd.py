"""Encoder recovery (issue 12, item 2): distillation of a pruned encoder from its dense self on mean-pooled
sentence embeddings (plus optional hidden-state KD), through the same trainer as decoders."""
import copy

import pytest
import torch
import torch.nn.functional as F

from families import family_model
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune
from shear.train.config import DistillConfig, TrainConfig
from shear.train.losses import embedding_loss, mean_pool
from shear.train.student import LossModule, teacher_hidden_states
from shear.train.trainer import train

CALIB = torch.randint(5, 128, (8, 16), generator=torch.Generator().manual_seed(2))


class Text(torch.utils.data.Dataset):
    """Plain-text items: token ids as labels, the last `pad` positions of odd items padding (-100)."""

    def __init__(self, n: int, seq_len: int = 16, seed: int = 0, pad: int = 4):
        self.x = torch.randint(5, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed))
        self.pad = pad

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        labels = self.x[i].clone()
        if i % 2:
            labels[-self.pad:] = -100
        return {"input_ids": self.x[i], "labels": labels}


def _mean_cosine(student, teacher, ds) -> float:
    batch = [ds[i] for i in range(len(ds))]
    ids = torch.stack([b["input_ids"] for b in batch])
    mask = torch.stack([b["labels"] != -100 for b in batch]).long()
    with torch.no_grad():
        e_s = mean_pool(student(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        e_t = mean_pool(teacher(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    return F.cosine_similarity(e_s, e_t, dim=-1).mean().item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_pooling_and_embedding_loss_by_hand():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # [1, 3, 2], last token masked out
    e = mean_pool(h, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(e, torch.tensor([[2.0, 1.0]]))
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_loss(a, b, "cosine").item() == pytest.approx(1.0)  # 1 - 0 + 1 - 1
    assert embedding_loss(a, b, "mse", torch.tensor([2.0, 3.0])).item() == pytest.approx(2 * 1.0 + 3 * 0.5)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_encoder_kd_against_itself_is_zero(kind):
    model = family_model("bert")
    ds = Text(4)
    ids = torch.stack([ds[i]["input_ids"] for i in range(4)])
    labels = torch.stack([ds[i]["labels"] for i in range(4)])
    module = LossModule(model, DistillConfig(embedding_weight=1.0, embedding_loss=kind, hidden_weight=1.0), model)
    out = module(ids, labels, teacher_hidden_states(model, ids, (labels != -100).long()))
    assert out["embedding"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["hidden"].item() == pytest.approx(0.0, abs=1e-5) and out["loss"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["tokens"].item() == (labels[:, 1:] != -100).sum().item()
    # padding matters: the teacher run without the mask gives a different embedding, so a nonzero loss
    out = module(ids, labels, teacher_hidden_states(model, ids))
    assert out["embedding"].item() > 1e-4


def test_encoder_without_embedding_or_hidden_loss_is_refused():
    with pytest.raises(ValueError, match="distill.embedding_weight"):
        LossModule(family_model("bert"), DistillConfig(), family_model("bert"))


def test_pruned_encoder_recovers_cosine_with_embedding_kd(tmp_path):
    teacher = family_model("bert")
    student = copy.deepcopy(teacher)
    run_prune(student, None, PruneConfig(target={"ratio": 0.3}, structures=["mlp", "heads"], allocation="uniform"),
              ImportanceConfig(estimator="magnitude_l2", n_samples=8, seq_len=16), ids=CALIB)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    held_out = Text(16, seed=5)
    before = _mean_cosine(student, teacher, held_out)
    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1, resume=False)
    res = train(student, Text(64), Text(8, seed=1), cfg, tmp_path / "kd", teacher=teacher,
                distill=DistillConfig(embedding_weight=1.0, hidden_weight=0.1, layer_map=None))
    after = _mean_cosine(res.model.eval(), teacher, held_out)
    assert after > before + 0.05 and after > 0.97, (before, after)  # measured: 0.89 -> 0.995
    assert res.metrics["eval"][-1]["val_loss"] != res.metrics["eval"][-1]["val_loss"]  # NaN: no PPL for encoders
    assert (tmp_path / "kd").exists()


@pytest.mark.parametrize("p", [None, 0.0])
def test_train_dropout_applies_while_training_and_is_given_back(tmp_path, p):
    """train.dropout sets the student's dropout for training only (0: deterministic forward in train mode)."""
    teacher = family_model("bert")
    student = copy.deepcopy(teacher)
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    seen = []
    drop = next(m for m in student.modules() if isinstance(m, torch.nn.Dropout))
    drop.register_forward_hook(lambda m, i, o: seen.append((m.training, m.p)))
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, log_every=1, resume=False, dropout=p)
    res = train(student, Text(8), Text(4, seed=1), cfg, tmp_path / "kd", teacher=teacher,
                distill=DistillConfig(embedding_weight=1.0))
    assert {pp for training, pp in seen if training} == {0.1 if p is None else p}
    assert all(m.p == 0.1 for m in res.model.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(steps=1, dropout=1.0)


def test_train_dropout_reaches_llama_attention(tmp_path):
    """Llama-style attention reads a float attention_dropout, not an nn.Dropout: train.dropout sets and restores it."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(attention_dropout=0.0))
    attn = model.model.layers[0].self_attn
    seen = []
    attn.register_forward_hook(lambda m, i, o: seen.append((m.training, m.attention_dropout)))
    ds = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (8, 12))]
    res = train(model, ds, ds[:2], TrainConfig(steps=1, batch_size=4, log_every=1, resume=False, dropout=0.2),
                tmp_path / "t")
    assert {p for training, p in seen if training} == {0.2}
    assert res.model.model.layers[0].self_attn.attention_dropout == 0.0
