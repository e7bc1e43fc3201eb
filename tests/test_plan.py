"""Plans: exact parameter counting, targets, allocation, rounding, protection."""
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config
from shear.analyze import analyze
from shear.prune.config import PruneConfig
from shear.prune.plan import ParamCounter, build_plan, model_shapes
from shear.prune.slice import prune_


@pytest.fixture
def setup():
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval()
    g = analyze(m)
    scores = {x.name: torch.rand(x.num_units) for x in g.groups}
    return m, g, scores


def test_counter_by_hand(setup):
    m, g, _ = setup
    c = ParamCounter(g, model_shapes(m))
    assert c.count({}) == sum(p.numel() for p in m.parameters())
    # one KV group of layer 0: q rows 2 heads x 16 (x64), k, v rows 16 (x64), o columns 32 (x64)
    assert c.count({}) - c.count({"layers.0.kv_group": 1}) == 32 * 64 + 16 * 64 * 2 + 64 * 32
    # 8 hidden channels and 10 MLP channels of layer 1: overlap counted once (gate/up/down lose 10 x 56)
    full, d, i = c.count({}), 64, 96
    per_layer_other = 4 * 16 * d * 2 + 2 * 16 * d * 2 + 2 * d  # q, o, k, v, two norms
    want = full - 8 * (128 * 2 + 1) - 3 * (per_layer_other // d * 8) - 3 * 3 * i * 8 - 10 * 3 * (d - 8)
    assert c.count({"hidden": 8, "layers.1.mlp_channel": 10}) == want


@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_ratio_target_matches_sliced_model(setup, alloc):
    m, g, scores = setup
    cfg = PruneConfig(target={"ratio": 0.3}, structures=["mlp", "hidden"], allocation=alloc, round_to=8)
    plan = build_plan(g, scores, cfg, model_shapes(m))
    prune_(m, plan, g)
    n = sum(p.numel() for p in m.parameters())
    assert n == plan.meta["params_after"] <= int(plan.meta["params_before"] * 0.7)
    assert plan.meta["params_after"] > plan.meta["params_before"] * 0.6  # not grossly over-pruned
    widths = [layer.mlp.gate_proj.out_features for layer in m.model.layers]
    assert all(w % 8 == 0 for w in widths) and m.config.hidden_size % 8 == 0
    if alloc == "uniform":
        assert len(set(widths)) == 1


def test_global_follows_scores_and_lowest_go(setup):
    m, g, scores = setup
    scores["layers.0.mlp_channel"] = torch.arange(96.0) / 1000  # layer 0 least important everywhere
    cfg = PruneConfig(target={"ratio": 0.2}, structures=["mlp"], allocation="global")
    plan = build_plan(g, scores, cfg, model_shapes(m))
    assert len(plan.remove["layers.0.mlp_channel"]) > len(plan.remove.get("layers.1.mlp_channel", []))
    k = len(plan.remove["layers.0.mlp_channel"])
    assert plan.remove["layers.0.mlp_channel"] == list(range(k))  # the lowest scores go first


def test_budget_protection_and_fixed_ratios(setup):
    m, g, scores = setup
    total = sum(p.numel() for p in m.parameters())
    cfg = PruneConfig(target={"params": total - 20000}, structures=["mlp", "heads"], protected_layers=[1],
                      structure_ratios={"heads": 0.5}, allocation="uniform")
    plan = build_plan(g, scores, cfg, model_shapes(m))
    assert plan.meta["params_after"] <= total - 20000
    assert "layers.1.mlp_channel" not in plan.remove and "layers.1.kv_group" not in plan.remove
    assert len(plan.remove["layers.0.kv_group"]) == 1 and len(plan.remove["layers.2.kv_group"]) == 1
    cfg = PruneConfig(target={"ratio": 0.2}, protected_layers="^(0|2)$")
    assert cfg.is_protected(2) and not cfg.is_protected(1) and not cfg.is_protected(None)


def test_target_shape(setup):
    m, g, scores = setup
    cfg = PruneConfig(target={"shape": {"intermediate_size": 40, "num_key_value_heads": 1, "num_hidden_layers": 2,
                                        "hidden_size": 48}})
    plan = build_plan(g, scores, cfg, model_shapes(m))
    prune_(m, plan, g)
    c = m.config
    assert (c.intermediate_size, c.num_key_value_heads, c.num_attention_heads, c.num_hidden_layers, c.hidden_size) == \
        (40, 1, 2, 2, 48)
    assert plan.meta["params_after"] == sum(p.numel() for p in m.parameters())


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        PruneConfig(target={"ratio": 0.2, "params": 10})
    with pytest.raises(ValueError, match="structure_ratios"):
        PruneConfig(target={"ratio": 0.2}, structure_ratios={"attn": 0.5})
    with pytest.raises(ValueError, match="extra|unknown|Extra"):
        PruneConfig(target={"ratio": 0.2}, ratio=0.3)


def test_unreachable_target_names_structures(setup):
    m, g, scores = setup
    cfg = PruneConfig(target={"ratio": 0.9}, structures=["heads"])
    with pytest.raises(ValueError, match="cannot be reached"):
        build_plan(g, scores, cfg, model_shapes(m))


def test_degenerate_targets_and_protection_are_refused(setup, caplog):
    m, g, scores = setup
    total = sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="not below the model's"):  # was: silently pruned nothing
        build_plan(g, scores, PruneConfig(target={"params": total + 1}), model_shapes(m))
    with pytest.raises(ValueError, match=r"\[99\] do not exist \(the model has layers 0..2\)"):
        build_plan(g, scores, PruneConfig(target={"ratio": 0.2}, protected_layers=[99]), model_shapes(m))
    with pytest.raises(ValueError, match="matches none"):
        build_plan(g, scores, PruneConfig(target={"ratio": 0.2}, protected_layers="^9$"), model_shapes(m))
    caplog.set_level("WARNING", logger="shear")
    plan = build_plan(g, scores, PruneConfig(target={"ratio": 0.2}, structures=["mlp", "hidden"], protected_layers=[1]),
                      model_shapes(m))
    assert plan.remove["hidden"] and "layers.1.mlp_channel" not in plan.remove
    assert any("slices the protected layers" in r.message for r in caplog.records)


def test_uniform_hidden_rounds_to_the_head_count_for_llama(setup):
    """LlamaConfig rejects hidden % heads != 0: a hidden plan keeps a multiple of 4 heads' worth."""
    m, g, scores = setup
    plan = build_plan(g, scores, PruneConfig(target={"ratio": 0.1}, structures=["hidden"]), model_shapes(m))
    assert (64 - len(plan.remove["hidden"])) % 4 == 0


def test_pool_allocation_ranks_heads_and_channels_together(setup):
    """FLAP AL-AM: with every KV group scored below every MLP channel, the pool takes KV groups first
    (down to one per layer) and only then channels; 'global' takes the same fraction of each."""
    m, g, _ = setup
    scores = {x.name: (torch.rand(x.num_units) - (10 if x.kind == "kv_group" else 0)) for x in g.groups}
    shapes = model_shapes(m)
    target = {"ratio": 0.2}
    pool = build_plan(g, scores, PruneConfig(target=target, allocation="pool"), shapes)
    glob = build_plan(g, scores, PruneConfig(target=target, allocation="global"), shapes)
    heads = lambda plan: sum(len(v) for k, v in plan.remove.items() if k.endswith("kv_group"))  # noqa: E731
    assert heads(pool) == 3 and heads(glob) < 3  # one of two KV groups per layer: the most min_keep allows
    total = sum(p.numel() for p in m.parameters())
    assert pool.meta["params_after"] <= int(total * 0.8) and pool.meta["removed_ratio"] < 0.22


def test_pool_allocation_needs_standardized_scores():
    from shear.prune.config import ImportanceConfig
    from shear.prune.pipeline import run_prune

    m = LlamaForCausalLM(tiny_llama_config()).eval()
    with pytest.raises(ValueError, match="standardize=true"):
        run_prune(m, None, PruneConfig(target={"ratio": 0.2}, allocation="pool"), ImportanceConfig(estimator="magnitude_l2"))


def test_uniform_heads_keep_a_count_that_divides_hidden(tmp_path):
    """LlamaConfig rejects hidden % heads != 0: a uniform head plan keeps 4 of 8 heads (not 5), so the
    export is the stock class."""
    import json

    from shear.prune import export, prune_

    m = LlamaForCausalLM(tiny_llama_config(num_attention_heads=8, num_key_value_heads=8, head_dim=8)).eval()
    g = analyze(m)
    scores = {x.name: torch.rand(x.num_units) for x in g.groups}
    total = sum(p.numel() for p in m.parameters())
    per_head = 4 * 8 * 64  # q, k, v rows and o columns of one head
    plan = build_plan(g, scores, PruneConfig(target={"params": total - 2 * 3 * per_head}, structures=["heads"],
                                             allocation="uniform"), model_shapes(m))
    assert {len(v) for k, v in plan.remove.items() if k.endswith(".head")} == {4}
    prune_(m, plan, g)
    out = export(m, tmp_path / "o")
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def _balanced_setup(head_score: float):
    """A tiny GQA Llama (2 KV groups per layer) with flat scores: every KV group scores ``head_score``,
    every MLP channel 1.0, so the summed score of a plan is ``head_score x groups + channels`` removed."""
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval()
    g = analyze(m)
    scores = {x.name: torch.full((x.num_units,), head_score if x.kind == "kv_group" else 1.0) for x in g.groups}
    return m, g, scores


@pytest.mark.parametrize("head_score, heads_go", [(1e6, 0), (1e-3, 1)])
def test_balanced_picks_the_split_with_the_least_summed_score(head_score, heads_go):
    """Costly heads: every unit comes out of the MLP (no head removed); cheap heads: one KV group per layer
    goes and the MLP keeps more. Either way the widths are uniform and the target is met exactly as counted."""
    m, g, scores = _balanced_setup(head_score)
    cfg = PruneConfig(target={"ratio": 0.25}, structures=["heads", "mlp"], allocation="balanced")
    plan = build_plan(g, scores, cfg, model_shapes(m))
    assert plan.meta["heads_removed_per_layer"] == heads_go
    heads = {len(plan.remove.get(f"layers.{i}.kv_group", [])) for i in range(3)}
    mlp = {len(plan.remove.get(f"layers.{i}.mlp_channel", [])) for i in range(3)}
    assert heads == {heads_go} and len(mlp) == 1
    equal = build_plan(g, scores, cfg.model_copy(update={"allocation": "uniform"}), model_shapes(m))
    cost = lambda p: sum(head_score * len(v) if "kv_group" in k else len(v) for k, v in p.remove.items())  # noqa: E731
    assert cost(plan) <= cost(equal)
    prune_(m, plan, g)
    assert sum(p.numel() for p in m.parameters()) == plan.meta["params_after"] <= int(plan.meta["params_before"] * 0.75)
