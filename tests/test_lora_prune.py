"""LoRAPrune's gradient estimate and scores from LoRA factors."""
import torch

from shear.train.config import LoraConfig
from shear.train.lora import apply_lora
from shear.train.loraprune import estimated_weight_grad, lora_importance, update_ema
from test_train_worker import tiny_model


def test_estimate_is_exact_for_orthonormal_full_rank_A_and_zero_B():
    out_f, in_f, s = 5, 4, 2.0
    A = torch.linalg.qr(torch.randn(in_f, in_f))[0].T  # orthonormal rows, r = in
    B = torch.zeros(out_f, in_f, requires_grad=True)
    A.requires_grad_(True)
    W = torch.randn(out_f, in_f)
    x, y = torch.randn(7, in_f), torch.randn(7, out_f)
    W_eff = (W + s * B @ A).detach().requires_grad_(True)
    ((x @ W_eff.T - y) ** 2).sum().backward()
    ((x @ (W + s * B @ A).T - y) ** 2).sum().backward()
    est = estimated_weight_grad(A, B, A.grad, B.grad, s)
    torch.testing.assert_close(est, W_eff.grad)


def test_lora_importance_shapes_and_no_full_weight_grads():
    model = apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["up_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randint(0, 128, (2, 10))
    model(input_ids=x, labels=x).loss.backward()
    scores = lora_importance(model)
    assert sorted(scores) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.up_proj", "self_attn.o_proj")]
    base = model.get_base_model()
    for k, v in scores.items():
        W = base.get_submodule(k).base_layer.weight
        assert v.shape == W.shape and (v >= 0).all() and v.sum() > 0
        assert W.grad is None
    avg = update_ema(update_ema(None, scores), {k: torch.zeros_like(v) for k, v in scores.items()}, beta=0.5)
    torch.testing.assert_close(avg[k], 0.5 * scores[k])
