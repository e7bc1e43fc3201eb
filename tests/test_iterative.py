"""Prune while tuning: round budgets equal run_prune's iterative schedule, the step budget equals a
one-shot run, and LoRAPrune group scores equal a hand computation from full-weight gradients."""
import copy
import json

import pytest
import torch

from conftest import tiny_llama_config
from test_recipes_smoke import corpus, tiny_dir  # noqa: F401 (fixtures)


def _model(**over):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(**over)).eval()


def _ds(n=32, L=16, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, L), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _cfgs(steps=7, lr=1e-3, lora=None, estimator="magnitude_l1", ratio=0.4):
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.train.config import TrainConfig

    return (PruneConfig(target={"ratio": ratio}), ImportanceConfig(estimator=estimator, n_samples=4, seq_len=16,
                                                                   batch_size=2),
            TrainConfig(steps=steps, batch_size=4, lr=lr, lora=lora, log_every=1, eval_batches=1))


def test_rounds_hit_run_prune_targets_and_step_budget(tmp_path):
    from shear.prune.pipeline import run_prune
    from shear.train.iterative import prune_while_tuning, round_steps

    dense = _model()
    pcfg, icfg, tcfg = _cfgs(steps=7, lr=1e-9)  # ~no weight change: rescoring picks what run_prune picks
    ref = copy.deepcopy(dense)
    _, _, rep_ref = run_prune(ref, None, pcfg.model_copy(update={"iterative_steps": 3}), icfg, tmp_path / "ref")
    ref_plans = [p["remove"] for p in json.loads((tmp_path / "ref" / "plans.json").read_text())]

    model, rep = prune_while_tuning(copy.deepcopy(dense), None, pcfg, icfg, tcfg, _ds(), _ds(8, seed=2),
                                    tmp_path / "it", rounds=3)
    plans = [json.loads((tmp_path / "it" / f"round-{k}" / "prune" / "plans.json").read_text())[0]["remove"]
             for k in (1, 2, 3)]
    assert plans == ref_plans
    p0, final = rep_ref["params_before"], int(rep_ref["params_before"] * 0.6)
    assert [r["target_params"] for r in rep["rounds"]] == [int(p0 - (p0 - final) * k / 3) for k in (1, 2, 3)]
    assert all(r["params_after"] <= r["target_params"] for r in rep["rounds"])
    assert rep["params_after"] == rep_ref["params_after"] == sum(p.numel() for p in model.parameters())
    # token budget: 7 steps = 2 + 2 + 3, each round with its own checkpoints
    assert round_steps(7, 3) == [2, 2, 3]
    assert [r["steps"] for r in rep["rounds"]] == [2, 2, 3] and rep["total_steps"] == tcfg.steps
    for k in (1, 2, 3):
        assert (tmp_path / "it" / f"round-{k}" / "train" / "checkpoints").is_dir()
    assert all(r["val_ppl"] is not None for r in rep["rounds"])


def _hand_lora_scores(peft, graph, ids, batch_size):
    """G = dL/dW' by autograd on a merged plain copy; the factor gradients by the chain rule
    (G_B = s G A^T, G_A = s B^T G); |W' (G_B A + B G_A - G_B G_A)| summed per unit, each member's
    vector divided by its L2 norm, members added."""
    from shear.importance import criteria as C

    plain = copy.deepcopy(peft).merge_and_unload().requires_grad_(True)
    lora = {n.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                                                  m.scaling["default"])
            for n, m in peft.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    W = {n: p for n, p in plain.named_parameters()}
    total = {}
    for s in range(0, ids.shape[0], batch_size):
        x = ids[s: s + batch_size]
        plain.zero_grad()
        plain(input_ids=x, labels=x, use_cache=False).loss.backward()
        for g in graph.groups:
            per = []
            for m in g.members:
                key = m.param.removesuffix(".weight")
                if key not in lora:
                    continue
                A, B, sc = lora[key]
                G = W[m.param].grad
                G_B, G_A = sc * G @ A.T, sc * B.T @ G
                imp = (W[m.param].detach() * (G_B @ A + B @ G_A - G_B @ G_A)).abs()
                v = C.per_unit(imp, m.dim, m.units)
                per.append(v / v.norm())
            if per:
                v = torch.stack(per).sum(0)
                total[g.name] = total.get(g.name, 0) + v
    return total


def test_loraprune_group_scores_equal_hand_computation():
    from shear.analyze import analyze
    from shear.train.config import LoraConfig
    from shear.train.iterative import lora_calibration_scores
    from shear.train.lora import apply_lora

    model = _model(num_hidden_layers=1)
    graph = analyze(model)
    groups = [g for g in graph.groups if g.kind in ("kv_group", "mlp_channel", "hidden")]
    peft = apply_lora(model, LoraConfig(r=4, alpha=8))
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # B != 0, so both terms G A^T A and B B^T G matter
            torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 128, (4, 12))
    got = lora_calibration_scores(peft, groups, ids, batch_size=2)
    want = _hand_lora_scores(peft, graph, ids, 2)
    assert set(got) == {g.name for g in groups}
    for g in groups:
        assert torch.allclose(got[g.name], want[g.name], rtol=1e-4, atol=1e-7), g.name
        assert got[g.name].abs().sum() > 0


def test_loraprune_rounds_end_to_end(tmp_path, monkeypatch):
    import shear.data.text as text
    from shear.train.config import LoraConfig
    from shear.train.iterative import prune_while_tuning

    monkeypatch.setattr(text, "calibration_ids", lambda *a, **k: torch.randint(0, 128, (4, 16)))
    pcfg, icfg, tcfg = _cfgs(steps=4, lr=1e-2, lora=LoraConfig(r=4, alpha=8), estimator="loraprune")
    model, rep = prune_while_tuning(_model(), None, pcfg, icfg, tcfg, _ds(), _ds(8, seed=2), tmp_path, rounds=2)
    assert [r["steps"] for r in rep["rounds"]] == [2, 2]
    assert rep["params_after"] <= rep["target_params"] == int(rep["params_before"] * 0.6)
    assert rep["params_after"] == sum(p.numel() for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged
    assert (tmp_path / "round-1" / "loraprune_scores.safetensors").exists()


def test_loraprune_errors_outside_tuning(tmp_path):
    from shear.prune.config import ImportanceConfig
    from shear.prune.pipeline import run_prune
    from shear.train.iterative import prune_while_tuning

    pcfg, icfg, tcfg = _cfgs(estimator="loraprune")
    assert ImportanceConfig(estimator="loraprune").estimator == "loraprune"
    with pytest.raises(ValueError, match="tune_rounds"):
        run_prune(_model(), None, pcfg, icfg, ids=torch.randint(0, 128, (2, 8)))
    with pytest.raises(ValueError, match="train.lora"):
        prune_while_tuning(_model(), None, pcfg, icfg, tcfg, _ds(), _ds(), tmp_path, rounds=2)


def test_prune_while_tuning_recipe_loads_the_teacher_once(tiny_dir, corpus, tmp_path, monkeypatch):
    """run_recipe resolves distill.teacher before pruning; the rounds reuse it (was loaded twice)."""
    import yaml
    from transformers import AutoModelForCausalLM

    import shear.models as models
    from shear.config import load_recipe
    from shear.pipeline import run_recipe
    from test_recipes_smoke import ROOT, shrink

    teacher_dir = tmp_path / "teacher"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(teacher_dir)
    loads, real = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    path = ROOT / "recipes" / "reference" / "prune-while-tuning.yaml"
    data = yaml.safe_load(path.read_text())
    over = shrink(data, tiny_dir, corpus, tmp_path) + [f"distill.teacher={teacher_dir}", "prune.tune_rounds=2",
                                                        "train.steps=2", "train.save_every=0"]
    summary = run_recipe(load_recipe(path, over), tmp_path / "run")
    assert summary["prune"]["rounds_total"] == 2
    assert loads.count(str(teacher_dir)) == 1, loads
