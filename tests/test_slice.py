"""prune_ removes exactly what mask_ zeroes: logits equal at fp32 tolerance, for every family and group kind."""
import copy

import pytest
import torch

from families import FAMILIES, GQA, PRENORM, STRUCTURES, family_model, outputs
from shear.analyze import PrunePlan, analyze
from shear.prune import mask_, prune_

#: plan templates; "{heads}" is the attention group kind of the family ("kv_group" or "head")
PLANS = {
    "heads": {"layers.0.{heads}": [1], "layers.1.{heads}": [0]},
    "heads_nonuniform": {"layers.0.{heads}": [1]},
    "query_head": {"layers.0.query_head": [1], "layers.1.query_head": [0]},
    "mlp": {"layers.0.mlp_channel": [1, 5], "layers.1.mlp_channel": [0, 3]},
    "mlp_nonuniform": {"layers.0.mlp_channel": [1, 5, 7]},
    "hidden": {"hidden": [0, 5, 9, 33]},
    "attn_sublayer": {"layers.0.attn_sublayer": [0]},
    "mlp_sublayer": {"layers.1.mlp_sublayer": [0]},
    "layer": {"layers.0.layer": [0]},
}
LAYERNORM = ("cohere", "starcoder2", "gpt_neox", "phi", "gpt2", "opt", "bert")  # hidden slicing is not exact under LayerNorm (documented)
IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def cases():
    for fam in FAMILIES:
        for kind in PLANS:
            if kind == "query_head" and fam not in GQA:
                continue
            if kind.endswith("sublayer") and fam not in PRENORM:
                continue
            if fam in STRUCTURES and ("heads" in kind or kind in ("query_head", "hidden")):
                continue  # refused (tests/test_slice_families.py)
            yield fam, kind


def make_plan(model, kind):
    heads = "query_head" if kind == "query_head" else "kv_group"
    graph = analyze(model, heads=heads)
    att = next((g.kind for g in graph.groups if g.kind in ("head", "kv_group", "query_head")), None)
    return PrunePlan({k.format(heads=att): v for k, v in PLANS[kind].items()}), heads


def pruned_pair(fam, kind):
    """(pruned model, masked model, plan) of a fresh tiny model of ``fam``."""
    model = family_model(fam)
    plan, heads = make_plan(model, kind)
    masked = mask_(copy.deepcopy(model), plan, analyze(model, heads))
    return prune_(model, plan, analyze(model, heads)), masked, plan


@pytest.mark.parametrize("fam,kind", list(cases()))
def test_slice_equals_mask(fam, kind):
    pruned, masked, plan = pruned_pair(fam, kind)
    n_before = sum(p.numel() for p in masked.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_before
    a, b = outputs(pruned, IDS), outputs(masked, IDS)
    if fam == "bert" and kind == "hidden":  # the encoder output is hidden-sized: compare kept channels
        keep = [i for i in range(64) if i not in plan.remove["hidden"]]
        b = b[..., keep]
    if (kind == "hidden" and fam in LAYERNORM) or (kind == "layer" and fam == "bert"):
        # documented: LayerNorm statistics over fewer channels / post-norm blocks are not a zeroing
        assert a.shape == b.shape and (a - b).abs().max() > 1e-3
        return
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_slice_changes_the_model():
    """Guard against vacuous equality: removing a unit does change the logits."""
    model = family_model("llama")
    before = outputs(model, IDS)
    prune_(model, PrunePlan({"layers.0.kv_group": [0]}))
    assert (outputs(model, IDS) - before).abs().max() > 1e-3


def test_bert_layer_removal_equals_shallower_model():
    """Post-norm: removing block 0 equals a model built without it (same weights for block 1)."""
    model = family_model("bert")
    ref = family_model("bert", num_hidden_layers=1)
    sd = {k.replace("encoder.layer.1.", "encoder.layer.0."): v for k, v in model.state_dict().items()
          if not k.startswith("encoder.layer.0.")}
    ref.load_state_dict(sd)
    prune_(model, PrunePlan({"layers.0.layer": [0]}))
    torch.testing.assert_close(outputs(model, IDS), outputs(ref, IDS))


def test_config_follows_slicing():
    model = family_model("gemma2")
    graph = analyze(model)
    prune_(model, PrunePlan({"layers.0.layer": [0], "layers.0.kv_group": [1], "layers.1.kv_group": [1],
                             "layers.1.mlp_channel": list(range(10)), "layers.0.mlp_channel": list(range(10)),
                             "hidden": [1, 2, 3, 4]}), graph)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.layer_types) == (1, ["full_attention"])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    assert (cfg.intermediate_size, cfg.hidden_size) == (86, 60)
    attn = model.model.layers[0].self_attn
    assert attn.layer_idx == 0 and attn.num_key_value_groups == 2 and attn.sliding_window is None


def test_gemma3_per_head_norms_scaling_and_layer_types_follow_slicing(tmp_path):
    """Gemma 3: q_norm/k_norm (head_dim, shared by every head) keep their weights under head and hidden
    slicing; the sandwich norms lose the hidden channels; the query_pre_attn_scalar scaling and the final
    soft-cap stay; removing the only full-attention layer leaves one rotary table, as the stock class
    builds it from the new layer_types, so the export is stock and reloads with the same logits."""
    import json

    from transformers import AutoModelForCausalLM

    from shear.prune import export

    model = family_model("gemma3_text", query_pre_attn_scalar=24)
    q_norm = model.model.layers[0].self_attn.q_norm.weight.clone()
    k_norm = model.model.layers[0].self_attn.k_norm.weight.clone()
    masked = mask_(copy.deepcopy(model), PrunePlan({"layers.0.kv_group": [1], "hidden": [1, 2, 3, 4]}))
    prune_(model, PrunePlan({"layers.0.kv_group": [1], "hidden": [1, 2, 3, 4]}))
    torch.testing.assert_close(outputs(model, IDS), outputs(masked, IDS), atol=2e-5, rtol=1e-4)
    layer = model.model.layers[0]
    assert torch.equal(layer.self_attn.q_norm.weight, q_norm) and torch.equal(layer.self_attn.k_norm.weight, k_norm)
    assert [layer.get_submodule(n).weight.shape[0] for n in ("input_layernorm", "post_attention_layernorm",
                                                             "pre_feedforward_layernorm", "post_feedforward_layernorm")] == [60] * 4
    assert layer.self_attn.scaling == 24 ** -0.5 and model.config.final_logit_softcapping == 30.0
    before = outputs(model, IDS)
    prune_(model, PrunePlan({"layers.1.layer": [0]}))
    assert model.config.layer_types == ["sliding_attention"] and model.model.rotary_emb.layer_types == ["sliding_attention"]
    out = export(model, tmp_path / "o")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(outputs(again, IDS), outputs(model, IDS)) and not torch.equal(outputs(model, IDS), before)


def test_rmsnorm_correction_is_exact_and_needed():
    """Hidden slicing under RMSNorm: the sqrt(d/d') weight and d/d' eps rescale make it exact."""
    model = family_model("llama")
    masked = mask_(copy.deepcopy(model), PrunePlan({"hidden": list(range(0, 64, 4))}))
    pruned = prune_(copy.deepcopy(model), PrunePlan({"hidden": list(range(0, 64, 4))}))
    w_before = model.model.norm.weight[1].item()
    assert pruned.model.norm.weight[0].item() == pytest.approx(w_before * (64 / 48) ** 0.5)
    assert pruned.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps * 64 / 48)
    torch.testing.assert_close(outputs(pruned, IDS), outputs(masked, IDS), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("plan,match", [
    ({"layers.0.kv_group": [2]}, r"layers\.0\.kv_group.*out of range"),
    ({"layers.0.kv_group": [-1]}, r"layers\.0\.kv_group.*out of range"),
    ({"layers.0.kv_group": [0, 1]}, r"layers\.0\.kv_group.*all 2 units.*attn_sublayer"),
    ({"layers.1.mlp_channel": list(range(96))}, r"layers\.1\.mlp_channel.*all 96.*mlp_sublayer"),
    ({"hidden": list(range(64))}, r"'hidden'.*hidden size cannot be 0"),
    ({"layers.7.layer": [0]}, r"layers\.7\.layer.*not in the structure graph"),
    ({"layers.0.layer": [0], "layers.1.layer": [0]}, "every layer"),
    ({"layers.0.mlp_channel": ["x"]}, "integers"),
])
def test_bad_plans_raise(plan, match):
    model = family_model("llama")
    with pytest.raises(ValueError, match=match):
        prune_(model, PrunePlan(plan))


def test_stale_graph_is_refused():
    """A graph of the model before an earlier slicing no longer matches: a clear error, not a wrong cut."""
    model = family_model("llama")
    graph = analyze(model)
    prune_(model, PrunePlan({"hidden": [0, 1, 2, 3]}), graph)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp_channel.*stale graph"):
        prune_(model, PrunePlan({"layers.0.mlp_channel": [0]}), graph)


def test_unsupported_heads_mode():
    with pytest.raises(ValueError, match="heads"):
        analyze(family_model("llama"), heads="per_dim")


def test_generate_with_dropped_attention_uses_cache_consistently():
    """A dropped attention sublayer still advances the KV cache: cached greedy decoding == masked."""
    model = family_model("llama", use_cache=True)
    plan = PrunePlan({"layers.0.attn_sublayer": [0]})
    masked = mask_(copy.deepcopy(model), plan)
    prune_(model, plan)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:1], **kw), masked.generate(IDS[:1], **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_slice_equals_mask_on_cuda_bf16():
    model = family_model("qwen2").to("cuda", torch.bfloat16)
    plan = PrunePlan({"layers.0.kv_group": [1], "layers.1.mlp_channel": [0, 7], "hidden": [3, 4, 5, 6]})
    masked = mask_(copy.deepcopy(model), plan)
    prune_(model, plan)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    torch.testing.assert_close(outputs(model, IDS.cuda()), outputs(masked, IDS.cuda()), atol=0.1, rtol=0.05)
