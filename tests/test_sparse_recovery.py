"""Sparse recovery: training keeps pruned weights at exactly zero — after optimizer steps (full fine-tuning,
with weight decay and KD) and after the LoRA merge (re-masked, the cost measured) (shear.sparse.recovery)."""
import copy

import pytest
import torch

from shear.sparse import SparsifyConfig, sparsify_
from shear.sparse.recovery import MaskKeeper, zero_masks
from shear.train.config import DistillConfig, LoraConfig, TrainConfig
from shear.train.trainer import train
from test_train_worker import ToyDataset, tiny_model


def sparse_model():
    model = tiny_model()
    res = sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5))
    return model, res.pruned


def check_zeros_kept(before, after, masks):
    params = dict(after.named_parameters())
    for k, m in masks.items():
        assert (params[k].detach()[~m] == 0).all(), f"{k}: a pruned weight moved"
    moved = [k for k in masks if not torch.equal(params[k].detach()[masks[k]], before[k][masks[k]])]
    assert len(moved) == len(masks), "kept weights should train"


def test_full_finetune_keeps_zeros_through_optimizer_steps(tmp_path):
    model, pruned = sparse_model()
    masks = zero_masks(model, pruned)
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    teacher = copy.deepcopy(model)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, weight_decay=0.1, log_every=1, resume=False)
    res = train(model, ToyDataset(32), ToyDataset(8, seed=1), cfg, tmp_path / "ft", teacher=teacher,
                distill=DistillConfig(ce_weight=0.5, kd_weight=0.5), masks=masks)
    check_zeros_kept(before, res.model, masks)
    assert res.metrics["sparse_masks"]["nonzero_before_remask"] == 0  # nothing to re-mask: the steps kept them
    assert "val_ppl_merged" not in res.metrics["sparse_masks"]


def test_lora_merge_is_remasked_and_its_cost_measured(tmp_path):
    model, pruned = sparse_model()
    masks = zero_masks(model, pruned)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(steps=4, batch_size=4, lr=2e-2, log_every=1, resume=False, lora=LoraConfig(r=4))
    res = train(model, ToyDataset(32), ToyDataset(8, seed=1), cfg, tmp_path / "lora", masks=masks)
    assert type(res.model).__name__ == "LlamaForCausalLM"  # merged
    check_zeros_kept(before, res.model, masks)  # the merged B A is dense: the adapter was not an identity
    sm = res.metrics["sparse_masks"]
    assert sm["nonzero_before_remask"] > 0 and sm["masked_weights"] == sum(int((~m).sum()) for m in masks.values())
    assert sm["val_ppl_merged"] > 0 and sm["val_ppl_remasked"] > 0


def test_mask_keeper_refuses_masks_that_do_not_fit():
    model, pruned = sparse_model()
    masks = zero_masks(model, pruned)
    gate = "model.layers.0.mlp.gate_proj.weight"  # [48, 32]: its transpose does not fit
    with pytest.raises(ValueError, match="does not have"):
        MaskKeeper(model, {"model.layers.0.mlp.nope.weight": masks[gate]})
    with pytest.raises(ValueError, match="shapes differ"):
        MaskKeeper(model, {gate: masks[gate].t()})
