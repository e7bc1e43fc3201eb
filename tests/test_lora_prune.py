"""LoRAPrune's gradient estimate and scores from LoRA factors (reference: aim-uofa/LoRAPrune
``compute_sensitivity``: G_B A + B G_A - G_B G_A, |W' * G_hat|, per-module L2 norm, EMA from 0)."""
import torch

from families import family_model
from shear.train.config import LoraConfig
from shear.train.lora import apply_lora
from shear.train.loraprune import estimated_weight_grad, lora_importance, taylor_importance, update_ema
from test_train_worker import tiny_model


def test_estimate_by_hand():
    A, B = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]])  # r = 1, in = 2, out = 2
    gA, gB = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0], [1.0]])
    # G_B A = [[2, 4], [1, 2]], B G_A = [[0, 1], [0, 0]], G_B G_A = [[0, 2], [0, 1]]
    est = estimated_weight_grad(A, B, gA, gB)
    assert torch.equal(est, torch.tensor([[2.0, 3.0], [1.0, 1.0]]))
    W_eff = torch.tensor([[1.0, 0.0], [0.0, -1.0]]) + 2.0 * B @ A  # s = 2: [[3, 4], [0, -1]]
    assert torch.equal(taylor_importance(W_eff, est), torch.tensor([[6.0, 12.0], [0.0, 1.0]]))


def test_group_scores_normalise_each_module_by_hand():
    from shear.analyze.graph import Group, Member
    from shear.train.iterative import group_scores_from_elements

    elem = {"m1": torch.tensor([[6.0, 12.0], [0.0, 1.0]]), "m2": torch.tensor([[3.0, 4.0], [0.0, 0.0]])}
    units = torch.tensor([[0], [1]])
    g = Group("g", "mlp_channel", 2, [Member("m1.weight", 0, units), Member("m2.weight", 1, units, "in"),
                                        Member("norm.weight", 0, units, "norm")])
    got = group_scores_from_elements(elem, [g])["g"]
    # m1 rows [18, 1] / sqrt(325); m2 columns [3, 4] / 5; the norm has no adapter and is left out
    want = torch.tensor([18.0, 1.0]) / 325 ** 0.5 + torch.tensor([0.6, 0.8])
    torch.testing.assert_close(got, want)


def test_estimate_matches_autograd_factor_gradients():
    """The factor gradients autograd gives equal the chain rule from G = dL/dW' (G_B = s G A^T,
    G_A = s B^T G), so the estimate is s (G A^T A + B B^T G) - s^2 G A^T B^T G."""
    out_f, in_f, r, s = 5, 4, 2, 2.0
    W, x, y = torch.randn(out_f, in_f), torch.randn(7, in_f), torch.randn(7, out_f)
    A = torch.randn(r, in_f, requires_grad=True)
    B = torch.randn(out_f, r, requires_grad=True)  # B != 0: all three terms matter
    W_eff = (W + s * B @ A).detach().requires_grad_(True)
    ((x @ W_eff.T - y) ** 2).sum().backward()
    ((x @ (W + s * B @ A).T - y) ** 2).sum().backward()
    G, A_, B_ = W_eff.grad, A.detach(), B.detach()
    want = s * (G @ A_.T @ A_ + B_ @ B_.T @ G) - s * s * G @ A_.T @ B_.T @ G
    torch.testing.assert_close(estimated_weight_grad(A, B, A.grad, B.grad), want)


def test_estimate_is_s_times_the_gradient_for_orthonormal_full_rank_A_and_zero_B():
    out_f, in_f, s = 5, 4, 2.0
    A = torch.linalg.qr(torch.randn(in_f, in_f))[0].T  # orthonormal rows, r = in
    B = torch.zeros(out_f, in_f, requires_grad=True)
    A.requires_grad_(True)
    W = torch.randn(out_f, in_f)
    x, y = torch.randn(7, in_f), torch.randn(7, out_f)
    W_eff = (W + s * B @ A).detach().requires_grad_(True)
    ((x @ W_eff.T - y) ** 2).sum().backward()
    ((x @ (W + s * B @ A).T - y) ** 2).sum().backward()
    est = estimated_weight_grad(A, B, A.grad, B.grad)  # G_A = 0: only s G A^T A = s G is left
    torch.testing.assert_close(est, s * W_eff.grad)


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
    first = update_ema(None, scores)  # from 0, as the reference: 0.9 * 0 + 0.1 * cur
    torch.testing.assert_close(first[k], 0.1 * scores[k])
    avg = update_ema(update_ema(None, scores, beta=0.5), {k: torch.zeros_like(v) for k, v in scores.items()}, beta=0.5)
    torch.testing.assert_close(avg[k], 0.25 * scores[k])
    nan = {k: torch.full_like(v, float("nan")) for k, v in scores.items()}
    assert update_ema(avg, nan) is avg and update_ema(None, nan) is None  # a non-finite step is skipped


def test_conv1d_scores_in_the_weight_layout():
    """GPT-2's Conv1D stores [in, out]; scores come back in that layout (what group members index)."""
    model = apply_lora(family_model("gpt2"), LoraConfig(r=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randint(0, 128, (2, 10))
    model(input_ids=x, labels=x).loss.backward()
    scores = lora_importance(model)
    mod = model.get_base_model().get_submodule("transformer.h.0.mlp.c_fc")
    A, B, s = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]
    W = mod.base_layer.weight  # [in, out]
    want = taylor_importance(W.T + s * B @ A, estimated_weight_grad(A, B, A.grad, B.grad)).T
    assert scores["transformer.h.0.mlp.c_fc"].shape == W.shape
    torch.testing.assert_close(scores["transformer.h.0.mlp.c_fc"], want)
