"""Per-expert channel pruning of mixture-of-experts models (shear/importance/expert_channels.py,
shear/prune/expert_channels.py): statistics of the tokens the stock forward routes to each expert, sliced ==
masked (down-projection columns at zero), the criteria against random, stock exports reloaded in a fresh
process with the config's expert width updated, the CLI alone and with --experts. Tiny models of test_moe."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from shear.importance.expert_channels import (ChannelStats, accumulate_block_, channel_scores,
                                              collect_channel_stats, magnitude)
from shear.importance.experts import find_moe_blocks
from shear.prune.expert_channels import (EXPERT_WIDTH, ExpertChannelConfig, channels_to_remove, kept_channels,
                                         prune_expert_channels_, slice_expert_channels_)
from test_moe import IDS, MOE, check_reloads, logits, moe_model, saved_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_statistics_are_the_stock_forward_down_inputs_of_the_routed_tokens():
    """Brute force: capture every expert's down-projection input inside the stock eager experts forward (F.linear
    on a slice of down_proj; the default grouped_mm path computes the same), with the stock router's weights."""
    model = moe_model("qwen2_moe", experts_implementation="eager")
    b = find_moe_blocks(model)[-1]
    x = torch.randn(50, 64)
    down = b.experts.down_proj
    seen = {}
    linear = F.linear

    def spy(inp, w, bias=None):
        if w.dim() == 2 and w.untyped_storage().data_ptr() == down.untyped_storage().data_ptr():
            seen[(w.data_ptr() - down.data_ptr()) // (w.numel() * w.element_size())] = inp.detach().clone()
        return linear(inp, w, bias)

    from shear.importance.expert_channels import BlockChannels

    st = BlockChannels(ChannelStats.zeros(8, 32), ChannelStats.zeros(1, 48))
    with torch.no_grad():
        accumulate_block_(st, b, x)
        _, w, idx = b.router(x)
        F.linear = spy
        try:
            b.experts(x, idx, w)
        finally:
            F.linear = linear
        assert sorted(seen) == sorted(idx.unique().tolist()) and len(seen) >= 6
        for e, a in seen.items():
            slots, rows = torch.where((idx == e).T)  # the stock order: by top-k slot, then token
            we = w[rows, slots].double()[:, None]
            assert st.routed.count[e] == len(rows)
            torch.testing.assert_close(st.routed.x_sqsum[e], a.double().pow(2).sum(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(st.routed.w_sum[e], (a.double() * we).sum(0), rtol=1e-5, atol=1e-7)
        sh = b.block.shared_expert
        a = sh.act_fn(sh.gate_proj(x)) * sh.up_proj(x)
        g = torch.sigmoid(b.block.shared_expert_gate(x)).double()
        torch.testing.assert_close(st.shared.w_sqsum[0], (a.double() * g).pow(2).sum(0), rtol=1e-5, atol=1e-7)
    assert st.shared.count[0] == 50 and st.routed.count.sum() == 50 * b.top_k


def test_scores_on_hand_statistics_and_the_fallback():
    down = torch.tensor([[[1.0, 2.0, 0.0], [1.0, -2.0, 3.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # [E=2, H=2, I=3]
    gate_up = torch.ones(2, 6, 2)
    st = ChannelStats.zeros(2, 3)
    st.add_(0, torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 2.0]]), torch.tensor([1.0, 0.5]))
    sc, fb = channel_scores(st, down, gate_up, "wanda", weighted=False)
    torch.testing.assert_close(sc[0], torch.tensor([10 ** 0.5 * 1.0, 8 ** 0.5 * 2.0, 2 * 1.5], dtype=torch.float64))
    assert fb == [1]  # expert 1 got no token: its weight magnitude (column norms of down x gate/up row norms)
    torch.testing.assert_close(sc[1], magnitude(down, gate_up)[1])
    torch.testing.assert_close(magnitude(down, gate_up)[0], torch.tensor([2 ** 0.5, 8 ** 0.5, 3.0],
                                                                         dtype=torch.float64) * 2)
    sc, _ = channel_scores(st, down, gate_up, "wanda")  # weighted rows: [1, 2, 0] and [1.5, 1, 1]
    torch.testing.assert_close(sc[0, 1], torch.tensor(5 ** 0.5 * 2.0, dtype=torch.float64))
    sc, _ = channel_scores(st, down, gate_up, "flap", weighted=False)  # unbiased Var * ||W[:, j]||^2
    torch.testing.assert_close(sc[0], torch.tensor([2.0 * 2, 0.0, 2.0 * 9], dtype=torch.float64))
    assert channel_scores(ChannelStats.zeros(2, 3), down, gate_up, "flap")[1] == [0, 1]
    r = channel_scores(st, down, gate_up, "random", seed=3)[0]
    assert torch.equal(r, channel_scores(st, down, gate_up, "random", seed=3)[0])
    assert kept_channels(torch.tensor([[0.3, 0.1, 0.1, 0.5], [1.0, 2.0, 3.0, 0.0]]), 2).tolist() == [[0, 3], [1, 2]]
    assert [channels_to_remove(32, r) for r in (0.25, 0.5, 0.3)] == [8, 16, 9]
    with pytest.raises(ValueError, match="removes 0 of 32 channels"):
        channels_to_remove(32, 0.01)
    with pytest.raises(ValueError, match="criterion"):
        channel_scores(st, down, gate_up, "taylor")


def _masked_copy(model, keep, shared_keep):
    """The model with every dropped channel's down-projection column at zero."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for b in find_moe_blocks(m):
            drop = torch.ones_like(b.experts.down_proj[:, :1, :], dtype=torch.bool)
            drop.scatter_(2, keep[b.layer][:, None, :], False)
            b.experts.down_proj.masked_fill_(drop, 0.0)
            if b.layer in shared_keep:
                w = b.block.shared_expert.down_proj.weight
                d = torch.ones(w.shape[1], dtype=torch.bool)
                d[shared_keep[b.layer]] = False
                w[:, d] = 0.0
    return m


@pytest.mark.parametrize("name", list(MOE))
def test_sliced_equals_masked(name):
    model = moe_model(name)
    g = torch.Generator().manual_seed(7)
    keep = {b.layer: torch.stack([torch.randperm(32, generator=g)[:20].sort().values for _ in range(8)])
            for b in find_moe_blocks(model)}
    shared_keep = {b.layer: torch.randperm(48, generator=g)[:30] for b in find_moe_blocks(model)} \
        if name == "qwen2_moe" else {}
    before = logits(model, IDS)
    ref = logits(_masked_copy(model, keep, shared_keep), IDS)
    assert (ref - before).abs().max() > 1e-3  # not vacuous
    slice_expert_channels_(model, keep, {k: v.sort().values for k, v in shared_keep.items()})
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)
    assert getattr(model.config, EXPERT_WIDTH[model.config.model_type]) == 20
    for b in find_moe_blocks(model):
        assert b.experts.gate_up_proj.shape == (8, 40, 64) and b.experts.down_proj.shape == (8, 64, 20)
    if name == "qwen2_moe":
        assert model.config.shared_expert_intermediate_size == 30 and model.config.intermediate_size == 48
    if name == "qwen3_moe_norm_dense0":  # the dense layer is no expert
        assert model.model.layers[0].mlp.down_proj.in_features == 48 and model.config.intermediate_size == 48


def test_uneven_or_invalid_channels_are_refused():
    model = moe_model("mixtral")
    ar = torch.arange(16).expand(8, -1)
    with pytest.raises(ValueError, match="differ across layers"):
        slice_expert_channels_(model, {0: ar, 1: ar[:, :8]})
    with pytest.raises(ValueError, match="not distinct indices"):
        slice_expert_channels_(model, {0: ar, 1: ar.clone().fill_(3)})
    with pytest.raises(ValueError, match="sparse layers are"):
        slice_expert_channels_(model, {0: ar})
    assert all(b.experts.down_proj.shape[-1] == 32 for b in find_moe_blocks(model))  # a refusal changes nothing
    with pytest.raises(ValueError, match="magnitude criterion reads no activations"):
        ExpertChannelConfig(ratio=0.25, criterion="magnitude", routing_weight=False)
    with pytest.raises(ValueError, match="has no shared expert"):
        prune_expert_channels_(model, None, ExpertChannelConfig(ratio=0.25, shared="keep"), ids=IDS)


def _err(model, ref, cfg):
    m = copy.deepcopy(model)
    rep = prune_expert_channels_(m, None, cfg, ids=IDS)
    return float((logits(m, IDS) - ref).pow(2).mean()), rep


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe_norm_dense0", "qwen2_moe", "olmoe"])
def test_calibrated_criteria_beat_random(name):
    """On the calibration tokens, wanda and flap change the logits less than every one of 3 random draws."""
    model = moe_model(name)
    ref = logits(model, IDS)
    rand = [_err(model, ref, ExpertChannelConfig(ratio=0.5, criterion="random", seed=s))[0] for s in range(3)]
    for crit in ("wanda", "flap"):
        err, rep = _err(model, ref, ExpertChannelConfig(ratio=0.5, criterion=crit))
        assert err < min(rand), (crit, err, rand)
        assert rep["channels_after"] == 16 and sum(rep["layers"][str(b.layer)]["tokens"][e] for b in
                                                   find_moe_blocks(model) for e in range(8)) > 0


def test_routing_weight_and_the_routed_tokens_decide():
    """Weighted and unweighted statistics pick differently; experts no calibration token reaches (2 tokens, 4
    top-2 slots, 8 experts) fall back to magnitude and the report names them."""
    model = moe_model("olmoe")
    b = find_moe_blocks(model)[0]
    few = IDS[:1, :2]
    st = collect_channel_stats(model, few)[b.layer].routed
    empty = [e for e in range(8) if st.count[e] == 0]
    assert len(empty) >= 4 and st.count.sum() == 4
    rep = prune_expert_channels_(copy.deepcopy(model), None, ExpertChannelConfig(ratio=0.5), ids=few)
    assert rep["layers"]["0"]["fallback"] == empty and rep["fallback"] == "magnitude"
    assert rep["layers"]["0"]["tokens"] == [int(c) for c in st.count]
    sc, fb = channel_scores(st, b.experts.down_proj, b.experts.gate_up_proj, "wanda")
    mag = magnitude(b.experts.down_proj, b.experts.gate_up_proj)
    assert fb == empty and torch.equal(sc[empty], mag[empty]) and not torch.equal(sc, mag)
    st = collect_channel_stats(model, IDS)[b.layer].routed
    ka, ku = (kept_channels(channel_scores(st, b.experts.down_proj, b.experts.gate_up_proj, "wanda", w)[0], 16)
              for w in (True, False))
    assert not torch.equal(ka, ku)
    u = prune_expert_channels_(copy.deepcopy(model), None, ExpertChannelConfig(ratio=0.5, routing_weight=False),
                               ids=IDS)
    assert u["routing_weight"] is False and u["fallback_experts"] == sum(
        int((s.routed.count == 0).sum()) for s in collect_channel_stats(model, IDS).values())


def test_exports_reload_as_the_stock_class_in_a_fresh_process(tmp_path):
    from shear.prune.export import export

    dirs, ref = [], {}
    for name, shared in (("mixtral", "prune"), ("qwen3_moe_norm_dense0", "prune"), ("qwen2_moe", "prune"),
                         ("qwen2_moe", "keep"), ("olmoe", "prune")):
        model = moe_model(name)
        rep = prune_expert_channels_(model, None, ExpertChannelConfig(ratio=0.25, shared=shared), ids=IDS)
        assert rep["channels_after"] == 24 and rep["params_after"] < rep["params_before"]
        d = str(export(model, tmp_path / f"{name}-{shared}"))
        torch.save(IDS, d + "/ids.pt")
        dirs.append(d)
        ref[d] = (logits(model, IDS), type(model).__name__)
        cfg = json.loads(open(d + "/config.json").read())
        assert cfg[EXPERT_WIDTH[cfg["model_type"]]] == 24 and "auto_map" not in cfg
        if name == "qwen2_moe":
            assert cfg["shared_expert_intermediate_size"] == (36 if shared == "prune" else 48)
            assert rep["shared_expert"] == {"mode": shared, "channels_before": 48,
                                            "channels_after": 36 if shared == "prune" else 48}
    check_reloads(dirs, ref)


def test_cli_prunes_expert_channels_alone_and_after_experts(tmp_path, tiny_text, capsys):
    from transformers import AutoConfig

    from shear.cli import main

    src = saved_moe(tmp_path / "src", "qwen2_moe", tiny_text)
    calib = ["--calib", "shakespeare", "--n-samples", "4", "--seq-len", "32"]
    out = tmp_path / "out"
    assert main(["prune", str(src), "--expert-channels", "0.25", "--expert-channel-criterion", "flap", *calib,
                 "-o", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "expert_channels" and rep["criterion"] == "flap" and rep["calibration_text"]
    assert rep["channels_after"] == 24 and rep["shared_expert"]["channels_after"] == 36
    assert rep["recipe"]["expert_channels"]["ratio"] == 0.25 and "experts" not in rep["recipe"]
    c = AutoConfig.from_pretrained(out / "model")
    assert (c.moe_intermediate_size, c.shared_expert_intermediate_size, c.num_experts) == (24, 36, 8)
    assert "channels 32 -> 24 per expert (flap, routing-weighted), shared expert 48 -> 36" in capsys.readouterr().out
    both = tmp_path / "both"
    assert main(["prune", str(src), "--experts", "0.25", "--expert-channels", "0.5", "--keep-shared-expert", *calib,
                 "-o", str(both)]) == 0
    rep = json.loads((both / "report.json").read_text())
    assert rep["mode"] == "experts+expert_channels" and rep["experts"]["experts_after"] == 6
    assert rep["expert_channels"]["num_experts"] == 6 and rep["expert_channels"]["shared_expert"]["mode"] == "keep"
    assert rep["params_after"] == rep["expert_channels"]["params_after"] < rep["experts"]["params_after"]
    c = AutoConfig.from_pretrained(both / "model")
    assert (c.moe_intermediate_size, c.shared_expert_intermediate_size, c.num_experts) == (16, 48, 6)
    capsys.readouterr()
    for argv, msg in ((["--expert-channels", "0.25", "--ratio", "0.5"], "--ratio: width pruning does not combine"),
                      (["--keep-shared-expert"], "only with --expert-channels"),
                      (["--expert-channels", "0.25", "--expert-criterion", "random"], "only with --experts"),
                      (["--expert-channels", "0.25", "--stream"], "--stream: --expert-channels loads the model")):
        assert main(["prune", str(src), *argv, "-o", str(tmp_path / "x")]) != 0
        assert msg in capsys.readouterr().err
