"""Quirks of single families under slicing and export (the matrices in test_slice / test_family_matrix
check slice == mask and export == reload for every family; these check the quirk itself)."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from families import family_model, outputs
from shear.analyze import PrunePlan
from shear.prune import export, mask_, prune_

IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _reload(model, path):
    out = export(model, path)
    stock = "auto_map" not in json.loads((out / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not stock)
    assert torch.equal(outputs(again, IDS), outputs(model, IDS))
    return stock, json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("plan", [{"layers.0.kv_group": [1]}, {"layers.0.query_head": [0]}])
def test_olmo2_projection_norms_are_cut_and_rescaled(plan):
    """OLMo 2's q_norm/k_norm normalise the whole projection (H*D): removing heads cuts their weight
    with the heads and scales it by sqrt(n/n'), which slicing needs to equal zeroing."""
    model = family_model("olmo2")
    attn = model.model.layers[0].self_attn
    q0, k0 = attn.q_norm.weight.clone(), attn.k_norm.weight.clone()
    heads = "query_head" if "layers.0.query_head" in plan else "kv_group"
    from shear.analyze import analyze

    masked = mask_(copy.deepcopy(model), PrunePlan(plan), analyze(model, heads))
    prune_(model, PrunePlan(plan), analyze(model, heads))
    keep_q = list(range(32)) if heads == "kv_group" else [r for r in range(64) if (r // 16) % 2 == 1]
    torch.testing.assert_close(attn.q_norm.weight, q0[keep_q] * 2 ** 0.5)
    if heads == "kv_group":
        torch.testing.assert_close(attn.k_norm.weight, k0[:16] * 2 ** 0.5)
    else:
        assert torch.equal(attn.k_norm.weight, k0)
    torch.testing.assert_close(outputs(model, IDS), outputs(masked, IDS), atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # without the rescale the sliced model is not the zeroed one
        attn.q_norm.weight.div_(2 ** 0.5)
    assert (outputs(model, IDS) - outputs(masked, IDS)).abs().max() > 1e-3


def test_olmo2_sublayer_angles_see_the_residual_between_the_sublayers():
    """Post-norm block: the residual between attention and MLP is the MLP's input (not the input of the
    MLP's post-norm, which is the MLP output): attn_cos of block 0 is cos(x, x + norm(attn(x)))."""
    from shear.importance.calibrate import collect_activation_stats, cosine_tokens

    model = family_model("olmo2")
    seen = []
    h = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    stats = collect_activation_stats(model, IDS, batch_size=2)
    h.remove()
    with torch.no_grad():
        want = float(cosine_tokens(model.model.embed_tokens(IDS), seen[0]).clamp(-1, 1).sum())
    assert stats.attn_cos[0] == pytest.approx(want, rel=1e-5)


def test_granite_multipliers_survive_pruning_and_export(tmp_path):
    model = family_model("granite")
    prune_(model, PrunePlan({"layers.0.kv_group": [1], "layers.1.kv_group": [0], "hidden": [1, 2, 3, 4],
                             "layers.0.mlp_channel": [3], "layers.1.mlp_channel": [5]}))
    stock, cfg = _reload(model, tmp_path / "o")
    assert stock
    assert (cfg["embedding_multiplier"], cfg["residual_multiplier"], cfg["attention_multiplier"],
            cfg["logits_scaling"]) == (3.0, 0.5, 0.1, 4.0)
    assert model.model.layers[0].self_attn.scaling == 0.1


@pytest.mark.parametrize("gone,left", [(0, [1]), (1, [0])])
def test_smollm3_nope_layers_follow_layer_removal(tmp_path, gone, left):
    """no_rope_layers (1 = RoPE, 0 = NoPE) is re-indexed with the layers; the export is stock."""
    model = family_model("smollm3")
    before = outputs(model, IDS)
    prune_(model, PrunePlan({f"layers.{gone}.layer": [0]}))
    assert model.config.no_rope_layers == left and model.config.num_hidden_layers == 1
    assert model.model.layers[0].self_attn.use_rope == bool(left[0])
    stock, cfg = _reload(model, tmp_path / "o")
    assert stock and cfg["no_rope_layers"] == left
    assert not torch.equal(outputs(model, IDS), before)


def test_cohere_per_head_norms_shared_input_norm_and_logit_scale(tmp_path):
    """Cohere: q_norm/k_norm weights [heads, head_dim] lose the removed heads' rows; dropping the attention
    of a parallel block keeps the one input norm (the MLP reads it); logit_scale stays in the export;
    sublayer angles do not exist in a parallel block and are refused by name."""
    model = family_model("cohere")
    attn = model.model.layers[0].self_attn
    q0, k0 = attn.q_norm.weight.clone(), attn.k_norm.weight.clone()
    masked = mask_(copy.deepcopy(model), PrunePlan({"layers.0.kv_group": [1], "layers.1.attn_sublayer": [0]}))
    prune_(model, PrunePlan({"layers.0.kv_group": [1], "layers.1.attn_sublayer": [0]}))
    assert torch.equal(attn.q_norm.weight, q0[:2]) and torch.equal(attn.k_norm.weight, k0[:1])
    assert type(model.model.layers[1].input_layernorm).__name__ == "CohereLayerNorm"
    torch.testing.assert_close(outputs(model, IDS), outputs(masked, IDS), atol=2e-5, rtol=1e-4)
    stock, cfg = _reload(model, tmp_path / "o")
    assert not stock and cfg["logit_scale"] == 0.5

    from shear.importance.calibrate import collect_activation_stats, layer_scores

    stats = collect_activation_stats(family_model("cohere"), IDS, batch_size=2)
    assert set(layer_scores(stats, "layer", "block_influence")) == {0, 1}
    with pytest.raises(ValueError, match="mlp_sublayer.*in parallel"):
        layer_scores(stats, "mlp_sublayer", "block_influence")


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_per_head_fused_rows_and_parallel_residual(parallel):
    """GPT-NeoX's query_key_value rows are [head, (q, k, v), head_dim]: head 1 is rows 48..95 (D = 16);
    slicing equals zeroing with either residual; sublayer angles exist only for the sequential block."""
    from shear.analyze import analyze
    from shear.importance.calibrate import collect_activation_stats

    model = family_model("gpt_neox", use_parallel_residual=parallel)
    g = analyze(model)["layers.0.head"]
    qkv = next(m for m in g.members if m.param.endswith("query_key_value.weight"))
    assert qkv.units[1].tolist() == list(range(48, 96))
    plan = PrunePlan({"layers.0.head": [1], "layers.1.mlp_sublayer": [0]})
    masked = mask_(copy.deepcopy(model), plan)
    stats = collect_activation_stats(model, IDS, batch_size=2)
    assert bool(stats.attn_cos) != parallel
    prune_(model, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(masked, IDS), atol=2e-5, rtol=1e-4)


def test_phi_qk_layernorm_is_shared_by_heads_and_exports_per_layer(tmp_path):
    """Phi's optional q/k LayerNorms (over head_dim, one weight for every head) are left by head and hidden
    slicing; the stock class builds them from hidden // heads, so the export is per-layer and exact."""
    model = family_model("phi", qk_layernorm=True)
    attn = model.model.layers[0].self_attn
    q0 = attn.q_layernorm.weight.clone()
    plan = PrunePlan({"layers.0.head": [1], "layers.1.head": [2], "hidden": [3, 7]})
    prune_(model, plan)
    assert torch.equal(attn.q_layernorm.weight, q0) and model.config.num_attention_heads == 3
    stock, cfg = _reload(model, tmp_path / "o")
    assert not stock and cfg["model_type"] == "shear_phi"


@pytest.mark.parametrize("layout", [dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
                                    dict(multi_query=True, parallel_attn=True),
                                    dict(multi_query=False, parallel_attn=False, num_kv_heads=4, alibi=True, bias=True)])
def test_falcon_slices_mlp_and_layers_and_refuses_heads_and_hidden(tmp_path, layout):
    """Falcon in its other layouts (the family matrix runs new_decoder_architecture with two norms): one norm
    feeding a parallel block; multi-query [q; k; v]; sequential per-head q/k/v with ALiBi and biases. MLP
    channels and whole layers slice as zeroing them and reload exactly (the tied LM head counted once);
    heads and hidden are refused in one line each (head_dim = hidden // heads in its code), by the
    pipeline and by a plan."""
    from shear.analyze import analyze
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune

    model = family_model("falcon", **{"new_decoder_architecture": False, **layout})
    kinds = {g.kind for g in analyze(model).groups}
    assert kinds == {"mlp_channel", "hidden", "layer"}  # no sublayers: which norm feeds which depends on the config
    plan = PrunePlan({"layers.0.mlp_channel": [1, 5], "layers.1.layer": [0]})
    masked = mask_(copy.deepcopy(model), plan)
    prune_(model, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(masked, IDS), atol=2e-5, rtol=1e-4)
    _reload(model, tmp_path / "plan")
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    icfg = ImportanceConfig(n_samples=8, seq_len=16, estimator="flap")
    model, _, rep = run_prune(family_model("falcon", **{"new_decoder_architecture": False, **layout}), None,
                              PruneConfig(target={"ratio": 0.2}, structures=["mlp", "layers"]), icfg, ids=calib)
    assert rep["removed_ratio"] >= 0.2
    _reload(model, tmp_path / "o")
    for struct in ("heads", "hidden"):
        with pytest.raises(ValueError, match=f"^prune.structures: {struct}: falcon derives head_dim from "
                                             r"hidden_size // num_attention_heads[^\n]*: prune mlp and layers$"):
            run_prune(family_model("falcon", **layout), None, PruneConfig(target={"ratio": 0.2}, structures=[struct]),
                      icfg, ids=calib)
    with pytest.raises(ValueError, match="^group 'hidden': falcon derives head_dim"):
        prune_(family_model("falcon", **layout), PrunePlan({"hidden": [3]}))
