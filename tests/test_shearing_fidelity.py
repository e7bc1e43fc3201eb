"""Learned masks as LLM-Shearing (princeton-nlp/LLM-Shearing, l0_module.py) has them: the constraint holds
every layer to its target, log α stays clamped, eval masks keep exactly the expected (or target) count,
and hidden RMSNorms take their statistics over the kept channels, so the masked model is the sliced one."""
from __future__ import annotations

import math

import pytest
import torch

from shear.analyze import analyze
from shear.shearing import ShearingTerm, ShearTrainConfig, attach_masks, finish_, train_masks
from shear.shearing.masks import LOG_ALPHA_RANGE, deterministic_z, prob_nonzero
from tests.families import family_model, outputs


def _ids(n=2, t=16):
    return torch.randint(0, 128, (n, t))


def _constrain_only(masks, target, constraint, steps=150):
    """Optimise the Lagrangian alone (no task loss): what the constraint by itself does to the rows."""
    term = ShearingTerm(masks, target, warmup=1, mask_lr=0.1, lambda_lr=0.5, constraint=constraint)
    opt = torch.optim.AdamW(term.param_groups(), weight_decay=0.0)
    for step in range(steps):
        term.step = step
        loss = term()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        masks.constrain_()
    return prob_nonzero(masks.masks["mlp"].log_alpha).sum(1).detach() / masks.masks["mlp"].log_alpha.shape[1]


def test_constraint_holds_every_layer_to_its_target():
    """Layer 0 keeps everything, layer 1 almost nothing: the total (52%) is near the 50% target. Per row
    (LLM-Shearing) both layers are pulled to 50%; per type the rows stay apart, so the final per-layer
    top-k would cut half of what layer 0 learned to keep."""
    spreads = {}
    for constraint in ("per_row", "per_type"):
        model = family_model("llama")
        masks = attach_masks(model, analyze(model), ("mlp",))
        with torch.no_grad():
            masks.masks["mlp"].log_alpha[0] = LOG_ALPHA_RANGE[1]
            masks.masks["mlp"].log_alpha[1] = LOG_ALPHA_RANGE[0]
        rows = _constrain_only(masks, {"mlp": 48}, constraint)
        spreads[constraint] = float(rows.max() - rows.min())
        if constraint == "per_row":
            assert (rows - 0.5).abs().max() < 0.05, rows
        else:
            assert abs(float(rows.mean()) - 0.5) < 0.05, rows
    assert spreads["per_type"] > 0.5 and spreads["per_row"] < 0.1, spreads


def test_per_row_gap_by_hand():
    """L = mean_r(λ₁·gap_r + λ₂·gap_r²) per type; per type it is λ₁·gap + λ₂·gap² of the rows' mean."""
    from shear.shearing.target import Lagrangian

    expected = {"mlp": torch.tensor([96.0, 0.0])}  # rows at 1.0 and 0.0, target 0.5: mean gap 0
    for per_row, want in ((True, 0.25), (False, 0.0)):
        lag = Lagrangian({"mlp": 96}, {"mlp": 48}, {"mlp": 2}, warmup=1, per_row=per_row)
        with torch.no_grad():
            lag.lambdas["mlp"].copy_(torch.tensor([1.0, 1.0]))
        loss, report = lag(expected, step=1)
        assert float(loss.detach()) == pytest.approx(want) and report["mlp"] == (0.5, 0.5)


def test_log_alpha_is_clamped_after_every_step():
    model = family_model("qwen2", std=0.05)
    masks = attach_masks(model, analyze(model), ("heads", "mlp"))
    lo, hi = LOG_ALPHA_RANGE
    assert (lo, hi) == pytest.approx((math.log(1e-2), math.log(1e2)))
    log = train_masks(model, masks, {"mlp": 8, "heads": 1}, [_ids(4)],
                      ShearTrainConfig(steps=6, warmup=1, mask_lr=20.0, lambda_lr=20.0))
    assert len(log) == 6
    for m in masks.masks.values():  # a step of 20 from any start leaves the range unless clamped
        la = m.log_alpha.detach()
        assert lo - 1e-6 <= float(la.min()) and float(la.max()) <= hi + 1e-6  # float32 bounds
    assert float(masks.masks["mlp"].log_alpha.detach().min()) == pytest.approx(lo)  # the constraint pushed units to the floor
    with torch.no_grad():
        masks.masks["mlp"].log_alpha.fill_(50.0)
    masks.draw()  # every forward clamps first (the trainer path: the next draw after a step)
    assert float(masks.masks["mlp"].log_alpha.detach().max()) == pytest.approx(hi)
    free = attach_masks(model, analyze(model), ("mlp",), log_alpha_range=None)
    with torch.no_grad():
        free.masks["mlp"].log_alpha.fill_(50.0)
    free.draw()
    assert float(free.masks["mlp"].log_alpha.detach().max()) == 50.0
    from pydantic import ValidationError

    from shear.prune.config import LearnConfig

    assert LearnConfig(steps=1).log_alpha_range == pytest.approx(LOG_ALPHA_RANGE)
    with pytest.raises(ValidationError, match="log_alpha_range"):
        LearnConfig(steps=1, log_alpha_range=(1.0, -1.0))


def test_eval_masks_keep_exactly_the_expected_count():
    """Each eval row keeps round(Σ P(z > 0)) units, the top ones by log α; hidden is binary."""
    model = family_model("llama", num_hidden_layers=4)
    masks = attach_masks(model, analyze(model))
    with torch.no_grad():
        for m in masks.masks.values():  # all above log(1/11): deterministic z > 0 everywhere
            m.log_alpha.uniform_(-2.0, 4.0)
    masks.eval()
    z = masks.draw()
    for t, m in masks.masks.items():
        want = prob_nonzero(m.log_alpha).sum(1).round().long()
        assert ((z[t] != 0).sum(1) == want).all(), t
        assert (deterministic_z(m.log_alpha) > 0).sum() > want.sum(), t  # no top-k would keep every unit
        for r in range(z[t].shape[0]):
            kept, la = z[t][r] != 0, m.log_alpha[r].detach()
            if (~kept).any():
                assert la[kept].min() >= la[~kept].max()
    assert set(z["hidden"].unique().tolist()) <= {0.0, 1.0}
    ShearingTerm(masks, {"mlp": 40, "heads": 1}, warmup=1, eval_keep="target")
    z = masks.draw()
    assert ((z["mlp"] != 0).sum(1) == 40).all() and ((z["heads"] != 0).sum(1) == 1).all()
    assert (z["hidden"] != 0).all() and (z["layers"] != 0).all()  # no target: every unit
    masks.train()
    assert masks.draw()["mlp"].shape == (4, 96)  # training still samples


@pytest.mark.parametrize("family,hidden_norm", [("llama", "kept"), ("qwen3", "kept"), ("gemma", "kept"),
                                                ("llama", "all")])
def test_masked_eval_model_is_the_sliced_model(family, hidden_norm):
    """With eval_keep=target the eval masks are the finish's top-k: the masked eval logits equal the
    sliced model's, hidden channels included. With hidden_norm=kept the norms keep their own weights
    and ε (the masked RMSNorm divided by the kept channels); with 'all' they take sqrt(d/k)."""
    model = family_model(family, num_hidden_layers=3)
    ref = model.model.norm.weight.detach().clone()
    eps = model.config.rms_norm_eps
    target = {"layers": 2, "heads": 1, "mlp": 40, "hidden": 48}
    masks = attach_masks(model, analyze(model), tuple(target), hidden_norm=hidden_norm)
    with torch.no_grad():
        for m in masks.masks.values():
            m.log_alpha.uniform_(-1.0, 4.0)
    ShearingTerm(masks, target, warmup=1, eval_keep="target")
    masks.eval()
    ids = _ids()
    masked = outputs(model, ids)
    kept = masks.current["hidden"][0] != 0
    assert int(kept.sum()) == 48
    finish_(model, masks, target)
    torch.testing.assert_close(outputs(model, ids), masked, rtol=1e-4, atol=1e-5)
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 2
    c = math.sqrt(64 / 48)
    w = model.model.norm.weight.detach()
    if hidden_norm == "kept":
        assert model.config.rms_norm_eps == eps
        if family != "gemma":  # Gemma's tied head carries a factor of its own
            torch.testing.assert_close(w, ref[kept])
    else:
        torch.testing.assert_close(w, ref[kept] * c)
        assert model.config.rms_norm_eps == pytest.approx(eps * 64 / 48)


def test_kept_norm_statistic_by_hand():
    """The hooked RMSNorm of a masked model computes rsqrt(mean over the kept channels), not over all."""
    model = family_model("llama")
    masks = attach_masks(model, analyze(model), ("hidden",))
    with torch.no_grad():
        masks.masks["hidden"].log_alpha[0, 40:] = LOG_ALPHA_RANGE[0]
    ShearingTerm(masks, {"hidden": 40}, warmup=1, eval_keep="target")
    masks.eval()
    seen = {}
    norm = model.model.layers[1].input_layernorm
    h = norm.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    outputs(model, _ids())
    h.remove()
    x = seen["x"][..., :40]
    assert seen["x"][..., 40:].abs().max() == 0
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight[:40]
    torch.testing.assert_close(seen["y"][..., :40], want, rtol=1e-5, atol=1e-6)
