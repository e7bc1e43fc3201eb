"""The structure graph: hand-checked groups, meta == real, config-only directories, fallback, CLI."""
import copy
import json
import re
import time

import pytest
import torch

from families import FAMILIES, family_config, family_model, outputs
from shear.analyze import PrunePlan, analyze, analyze_path
from shear.prune import export, mask_, prune_


def _units(graph, group, param_suffix):
    return next(m for m in graph[group].members if m.param.endswith(param_suffix))


def test_llama_kv_group_by_hand(tiny_llama):
    g = analyze(tiny_llama)
    grp = g["layers.0.kv_group"]
    assert grp.num_units == 2 and grp.meta["heads"] == 4 and grp.meta["kv_heads"] == 2
    q, k = _units(g, "layers.0.kv_group", "q_proj.weight"), _units(g, "layers.0.kv_group", "k_proj.weight")
    o = _units(g, "layers.0.kv_group", "o_proj.weight")
    assert q.dim == 0 and q.units[1].tolist() == list(range(32, 64))  # query heads 2, 3 of KV head 1
    assert k.units[1].tolist() == list(range(16, 32)) and o.dim == 1 and o.role == "in"
    # q 32 rows + k 16 + v 16 (x64 inputs) + o 32 columns (x64 outputs)
    assert grp.params_per_unit == (32 + 16 + 16) * 64 + 32 * 64 == grp.macs_per_unit


def test_query_head_units_keep_every_kv_head(tiny_llama):
    g = analyze(tiny_llama, heads="query_head")
    grp = g["layers.1.query_head"]
    assert grp.num_units == 2 and not any("k_proj" in m.param or "v_proj" in m.param for m in grp.members)
    # unit 1 = query head 1 of KV group 0 and query head 3 of KV group 1
    assert _units(g, "layers.1.query_head", "q_proj.weight").units[1].tolist() == \
        list(range(16, 32)) + list(range(48, 64))


def test_mha_gives_heads_and_every_param_is_covered():
    for fam in ("gpt2", "opt", "bert"):
        g = analyze(family_model(fam), heads="query_head")
        assert {x.kind for x in g.groups if x.layer == 0} >= {"head", "mlp_channel", "layer"}
        assert g["layers.0.head"].num_units == 4
    g = analyze(family_model("llama"))
    covered = {m.param for grp in g.groups for m in grp.members}
    assert covered == {n for n, _ in family_model("llama").named_parameters()}


def test_hidden_and_totals_by_hand():
    model = family_model("llama")
    g = analyze(model)
    # per channel: embed 128 + lm_head 128 + 5 norms + per layer q 64 + k 32 + v 32 + o 64 + 3 x 96
    assert g["hidden"].params_per_unit == 128 + 128 + 5 + 2 * (64 + 32 + 32 + 64 + 3 * 96)
    assert g.total_params == sum(p.numel() for p in model.parameters())
    assert g.total_macs == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tied = analyze(family_model("gemma"))  # tied: embedding counted once, LM head MACs still counted
    assert tied["hidden"].meta["tied_embeddings"]
    # MACs add the tied LM head (128) and skip the embedding lookup (128) and the 5 norms
    assert tied["hidden"].macs_per_unit - tied["hidden"].params_per_unit == 128 - 128 - 5


def test_fused_indices_map_into_fused_rows():
    g = analyze(family_model("phi3"))
    qkv = _units(g, "layers.0.kv_group", "qkv_proj.weight")
    # q heads 0-1 (rows 0..31), k head 0 (rows 64..79), v head 0 (rows 96..111)
    assert qkv.units[0].tolist() == list(range(32)) + list(range(64, 80)) + list(range(96, 112))
    gu = _units(g, "layers.0.mlp_channel", "gate_up_proj.weight")
    assert gu.units[5].tolist() == [5, 96 + 5]
    gpt = analyze(family_model("gpt2"))
    assert _units(gpt, "layers.0.head", "c_attn.weight").dim == 1  # Conv1D weights are [in, out]
    assert _units(gpt, "layers.0.head", "c_proj.weight").dim == 0


@pytest.mark.parametrize("fam", FAMILIES)
def test_meta_analysis_equals_real(fam):
    cfg = family_config(fam)
    real = analyze(family_model(fam))
    with torch.device("meta"):
        meta_model = type(family_model(fam))(cfg)
    meta = analyze(meta_model)
    assert [g.name for g in meta.groups] == [g.name for g in real.groups]
    assert (meta.total_params, meta.total_macs) == (real.total_params, real.total_macs)
    for a, b in zip(meta.groups, real.groups):
        assert (a.params_per_unit, a.macs_per_unit) == (b.params_per_unit, b.macs_per_unit)
        assert all(torch.equal(x.units, y.units) and x.param == y.param for x, y in zip(a.members, b.members))


def test_prune_on_meta_matches_shapes():
    """Slicing works on meta tensors (plans can be costed for a 70B model without weights)."""
    with torch.device("meta"):
        model = type(family_model("llama"))(family_config("llama"))
    prune_(model, PrunePlan({"layers.0.kv_group": [0], "layers.1.kv_group": [0], "hidden": [1, 2, 3, 4]}))
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 60)


def test_7b_config_only_directory(tmp_path):
    """A directory with only config.json (Llama-3-8B shape) is analyzed on meta in seconds."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    t0 = time.perf_counter()
    g = analyze_path(tmp_path)
    elapsed = time.perf_counter() - t0
    print(f"7B-shaped meta analysis: {elapsed:.2f} s, {len(g.groups)} groups")
    assert g.total_params == 8_030_261_248  # Llama-3-8B
    assert g["layers.31.kv_group"].num_units == 8 and g["layers.0.mlp_channel"].num_units == 14336
    assert elapsed < 60


def test_analyze_path_rejects_unknown_family_on_meta(tmp_path):
    from transformers import OlmoConfig

    OlmoConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="olmo.*not one of the families"):
        analyze_path(tmp_path)


def _olmo(kv=4):
    from transformers import OlmoConfig, OlmoForCausalLM

    cfg = OlmoConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64, use_cache=False,
                     pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = OlmoForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_torch_pruning_fallback_mlp_and_hidden(tmp_path):
    model = _olmo()
    g = analyze(model)
    assert g.family == "torch_pruning:olmo"
    mlp = g["layers.0.mlp_channel"]
    assert [m.param.split(".")[-2] for m in mlp.members] == ["gate_proj", "up_proj", "down_proj"]
    assert g["hidden"].params_per_unit == 128 + 128 + 2 * (64 * 3 + 64 + 96 * 3)
    assert g.meta["skipped_attention"]  # heads are not taken from torch-pruning
    plan = PrunePlan({"layers.0.mlp_channel": [1, 2], "layers.1.layer": [0]})
    masked = mask_(copy.deepcopy(model), plan, g)
    prune_(model, plan, g)
    ids = torch.randint(2, 128, (2, 7))
    torch.testing.assert_close(outputs(model, ids), outputs(masked, ids), atol=2e-5, rtol=1e-4)
    from transformers import AutoModelForCausalLM

    out = export(model, tmp_path / "o")
    torch.testing.assert_close(outputs(AutoModelForCausalLM.from_pretrained(out), ids), outputs(model, ids))


def test_torch_pruning_fallback_analyzes_gqa_without_hanging(tmp_path):
    """GQA (4 query / 2 KV heads): attention is found by structure and never handed to torch-pruning
    (its q/k/v groups loop forever, Torch-Pruning#527); MLP channels, hidden and layers still come from
    the graph, and slicing them equals masking them and exports a model that reloads identically."""
    from transformers import AutoModelForCausalLM

    model = _olmo(kv=2)
    t0 = time.perf_counter()
    g = analyze(model)
    assert time.perf_counter() - t0 < 5
    assert g.family == "torch_pruning:olmo" and {x.kind for x in g.groups} == {"mlp_channel", "hidden", "layer"}
    assert sorted(g.meta["skipped_attention"]) == sorted(f"model.layers.{i}.self_attn.{p}_proj"
                                                         for i in range(2) for p in "qkv")
    hidden = {(m.param, m.dim) for m in g["hidden"].members}
    assert {(f"model.layers.1.self_attn.{p}_proj.weight", 1) for p in "qkv"} <= hidden
    plan = PrunePlan({"layers.0.mlp_channel": [1, 2], "layers.1.layer": [0]})
    masked = mask_(copy.deepcopy(model), plan, g)
    prune_(model, plan, g)
    ids = torch.randint(2, 128, (2, 7))
    torch.testing.assert_close(outputs(model, ids), outputs(masked, ids), atol=2e-5, rtol=1e-4)
    out = export(model, tmp_path / "o")
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(out), ids), outputs(model, ids))


def test_fallback_finds_gqa_attention_whatever_it_is_called(monkeypatch):
    """Under GQA every Linear of a block child holding a K/V-wide projection is attention, even when no
    name says so (the name regex disabled here): none of them may become a torch-pruning root."""
    from shear.analyze import fallback

    monkeypatch.setattr(fallback, "_ATTN", re.compile(r"(?!)"))
    model = _olmo(kv=2)
    got = fallback.attention_linears(model, model.model.layers, "model.layers")
    assert got == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    mha = _olmo(kv=4)
    assert fallback.attention_linears(mha, mha.model.layers, "model.layers") == set()


def test_cli_analyze_and_export(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("COLUMNS", "200")
    from shear.cli.analyze import register
    import argparse

    model = family_model("llama")
    model.save_pretrained(tmp_path / "src")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(tmp_path / "src"), "--heads", "query_head"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "query_head" in table and "mlp_channel" in table and "hidden" in table
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"remove": {"layers.0.mlp_channel": [0, 1],
                                                                   "layers.1.mlp_channel": [2, 3]}}))
    args = parser.parse_args(["export", str(tmp_path / "src"), str(tmp_path / "out"), "--plan",
                              str(tmp_path / "plan.yaml")])
    assert args.func(args) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["intermediate_size"] == 94 and "auto_map" not in cfg
    recipe = yaml.safe_load((tmp_path / "out" / "shear_recipe.yaml").read_text())
    assert recipe["params_after"] == recipe["params_before"] - 2 * 2 * 3 * 64


def test_analyze_path_of_a_per_layer_export_needs_consent(tmp_path):
    """The meta-device build runs the export's modeling file: only with trust_remote_code, then it
    analyzes the per-layer shapes (model_type shear_<type> is still the family)."""
    from families import family_model
    from shear.analyze.graph import PrunePlan
    from shear.prune import export, prune_

    model = family_model("llama")
    prune_(model, PrunePlan({"layers.0.mlp_channel": [1, 2, 3]}))
    out = export(model, tmp_path / "o")
    with pytest.raises(ValueError, match="trust-remote-code"):
        analyze_path(out)
    g = analyze_path(out, trust_remote_code=True)
    assert g["layers.0.mlp_channel"].num_units == 93 and g["layers.1.mlp_channel"].num_units == 96


def test_plan_warns_when_asked_structures_have_no_groups(caplog):
    """The generic analyzer has no head groups: asking for heads + MLP prunes MLP only, and says so."""
    import logging

    from shear.prune.config import PruneConfig
    from shear.prune.plan import build_plan

    model = _olmo(kv=2)
    g = analyze(model)
    scores = {x.name: torch.rand(x.num_units) for x in g.groups}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    cfg = PruneConfig(target={"ratio": 0.1}, structures=["heads", "mlp"], allocation="uniform")
    with caplog.at_level(logging.WARNING, logger="shear"):
        plan = build_plan(g, scores, cfg, shapes)
    assert "no heads groups" in caplog.text and "generic analyzer" in caplog.text
    assert plan.meta["structures_not_found"] == ["heads"]
