"""Learned masks inside the trainer (``prune.learn``): the Lagrangian counts once per step, masks and
multipliers resume exactly from a checkpoint, the finished model has exactly the target shape and its
export reloads in a fresh process with identical logits; recipe keys that cannot apply are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shear.analyze import analyze
from shear.data.text import BlockDataset
from shear.prune.config import LearnConfig, PruneConfig
from shear.shearing import ShearingTerm, attach_masks
from shear.shearing.learn import learn_masks
from shear.train.config import DistillConfig, TrainConfig
from shear.train.trainer import train
from tests.families import family_model, outputs

KD = DistillConfig(ce_weight=0.0, kd_weight=1.0)


def _data(n=32, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BlockDataset(torch.randint(0, 128, (n, t), generator=g)), BlockDataset(torch.randint(0, 128, (4, t), generator=g))


def _pair(family="llama", **over):
    torch.manual_seed(0)
    teacher = family_model(family, std=0.05, **over)
    student = family_model(family, std=0.05, **over)
    student.load_state_dict(teacher.state_dict())
    return teacher.eval(), student


def _tcfg(steps, **kw):
    return TrainConfig(**{"steps": steps, "batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_batches": 1,
                          "resume": False, **kw})


def test_lagrangian_counts_once_per_step_whatever_the_accumulation(tmp_path):
    """The multipliers' gradient of one step (summed over its micro-batch backwards) depends on the expected
    sizes only: the same with 1 x 4 and 2 x 2 micro-batches, and equal to -(ŝ - t), -(ŝ - t)² (ascent)."""
    sums = []
    for bs, accum in ((4, 1), (2, 2)):
        teacher, model = _pair()
        masks = attach_masks(model, analyze(model), ("heads", "mlp"))
        term = ShearingTerm(masks, {"heads": 1, "mlp": 48}, warmup=1)
        seen = []
        for p in term.lagrangian.parameters():
            p.register_hook(lambda g: seen.append(g.detach().clone()))
        train_ds, val_ds = _data()
        train(model, train_ds, val_ds, _tcfg(1, batch_size=bs, grad_accum=accum), tmp_path / f"a{accum}",
              teacher=teacher, distill=KD, shearing=term)
        n = len(list(term.lagrangian.parameters()))
        assert len(seen) == n * accum
        sums.append(sum(torch.cat(seen[i:i + n]) for i in range(0, len(seen), n)))
    torch.testing.assert_close(sums[0], sums[1])
    gap = sums[0][0::2]  # step 0: the ramped target is still the full model, t = 1, so ŝ - t < 0
    assert (gap > 0).all() and torch.allclose(sums[0][1::2], -gap * gap)


def test_learned_masks_resume_exactly_from_a_checkpoint(tmp_path):
    """A run stopped after step 3 of 6 (its step-6 checkpoint removed) resumes from step 3: log α, λ, the
    weights and the data position come back, so the finished model equals the uninterrupted run's."""
    import shutil

    def run(out, resume):
        teacher, model = _pair()
        cfg = PruneConfig(target={"shape": {"intermediate_size": 48, "num_key_value_heads": 1}},
                          learn=LearnConfig(steps=6, warmup=2, mask_lr=0.2))
        train_ds, val_ds = _data()
        return learn_masks(model, cfg, _tcfg(6, save_every=3, resume=resume), train_ds, val_ds, out,
                           teacher=teacher, distill=KD)

    full, _ = run(tmp_path / "full", False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-6")
    resumed, rep = run(tmp_path / "cut", True)
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(outputs(resumed, ids), outputs(full, ids), rtol=0, atol=0)
    assert resumed.config.intermediate_size == 48 and resumed.config.num_key_value_heads == 1
    assert rep["target_units"] == {"heads": 1, "mlp": 48}
    fresh, _ = run(tmp_path / "again", False)  # and a run that never saw the checkpoint differs from neither
    torch.testing.assert_close(outputs(fresh, ids), outputs(full, ids), rtol=0, atol=0)


RELOAD = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = load_file(sys.argv[1] + "/../io.safetensors")["ids"]
    with torch.no_grad():
        got = m.eval()(input_ids=ids).logits
    want = load_file(sys.argv[1] + "/../io.safetensors")["out"]
    assert torch.equal(got, want), (got - want).abs().max()
    print(type(m).__name__, m.config.hidden_size, m.config.intermediate_size, m.config.num_key_value_heads)
""")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_ratio_target_reached_exactly_and_export_reloads_fresh(family, tmp_path):
    from safetensors.torch import save_file

    from shear.prune.export import export

    teacher, model = _pair(family)
    p0 = sum(p.numel() for p in model.parameters())
    cfg = PruneConfig(target={"ratio": 0.4}, structures=["heads", "mlp", "hidden"],
                      learn=LearnConfig(steps=40, warmup=10, mask_lr=0.3, lambda_lr=0.3))
    train_ds, val_ds = _data()
    model, rep = learn_masks(model, cfg, _tcfg(40), train_ds, val_ds, tmp_path / "learn", teacher=teacher,
                             distill=KD, report_dir=tmp_path / "report")
    n = sum(p.numel() for p in model.parameters())
    assert n <= 0.6 * p0 and n == rep["params_after"]
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_key_value_heads) == (
        rep["target_units"]["hidden"], rep["target_units"]["mlp"], rep["target_units"]["heads"])
    rows = [json.loads(x) for x in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines() if "lagrangian" in x]
    last = rows[-1]
    for t in ("heads", "mlp", "hidden"):  # the ramped target reached the goal; the expected size follows it
        assert last[f"target_{t}"] == pytest.approx(rep["target_units"][t] / rep["full_units"][t])
        assert last[f"size_{t}"] < rows[0][f"size_{t}"]
    assert (tmp_path / "report" / "mask_sizes.png").stat().st_size > 0
    ids = torch.randint(0, 128, (2, 16))
    out = export(model, tmp_path / "model")
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # uniform: the stock class
    save_file({"ids": ids, "out": outputs(model, ids).contiguous()}, str(tmp_path / "io.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_layernorm_hidden_and_lora_are_refused(tmp_path):
    model = family_model("gpt2")
    with pytest.raises(ValueError, match="LayerNorm"):
        attach_masks(model, analyze(model), ("heads", "hidden"))
    teacher, model = _pair()
    term = ShearingTerm(attach_masks(model, analyze(model), ("mlp",)), {"mlp": 48}, warmup=1)
    train_ds, val_ds = _data()
    with pytest.raises(ValueError, match="LoRA"):
        train(model, train_ds, val_ds, _tcfg(1, lora={"r": 2}), tmp_path, teacher=teacher, distill=KD, shearing=term)


@pytest.mark.parametrize("over,match", [
    ({"importance": {"estimator": "flap"}}, "importance"),
    ({"prune": {"target": {"ratio": 0.5}, "allocation": "global", "learn": {"steps": 5}}}, "allocation"),
    ({"prune": {"target": {"ratio": 0.5}, "tune_rounds": 2, "learn": {"steps": 5}}}, "tune_rounds"),
    ({"train": None}, "train section"),
    ({"train": {"steps": 5, "lora": {"r": 4}}}, "weight_lr"),
    ({"prune": {"target": {"ratio": 0.5}, "learn": {"steps": 5, "warmup": 9}}}, "warmup"),
])
def test_recipe_refuses_what_learned_masks_cannot_honour(over, match):
    from shear.config import validate_recipe

    base = {"model": {"path": "reference-teacher"}, "prune": {"target": {"ratio": 0.5}, "learn": {"steps": 5}},
            "train": {"steps": 5}}
    d = {**base, **over}
    if d["train"] is None:
        del d["train"]
    with pytest.raises(ValueError, match=match):
        validate_recipe(d)
    ok = validate_recipe(base)
    assert ok.prune.allocation == "uniform" and ok.prune.learn.ramp() == 1


def test_score_initialized_masks_change_no_logits_and_follow_the_scores():
    """prune.learn.init: scores — log α ordered by the estimator's scores within each row, eval masks still 1."""
    from shear.shearing.learn import init_scores
    from shear.shearing.masks import deterministic_z, init_from_scores_

    _, model = _pair()
    graph = analyze(model)
    ids = torch.randint(0, 128, (2, 16))
    ref = outputs(model, ids)
    from shear.prune.config import ImportanceConfig

    scores, _ = init_scores(model, graph, ("heads", "mlp", "hidden"), ImportanceConfig(estimator="flap"), None,
                            ids=torch.randint(0, 128, (4, 16)))
    masks = attach_masks(model, graph, ("heads", "mlp", "hidden"))
    init_from_scores_(masks, scores)
    masks.eval()
    for m in masks.masks.values():  # eval masks of every unit (by default they keep round(Σ P(z > 0)): P ≥ 0.98 here)
        m.keep = m.log_alpha.shape[1]
    assert torch.equal(outputs(model, ids), ref)
    for t, m in masks.masks.items():
        assert torch.equal(deterministic_z(m.log_alpha), torch.ones_like(m.log_alpha))
        for row, g in enumerate(masks.groups[t]):  # the best-scored unit has the largest log α, the worst the least
            s = scores[g.name]
            assert m.log_alpha[row].argmax() == s.argmax() and m.log_alpha[row].argmin() == s.argmin()
    from shear.config import validate_recipe

    ok = validate_recipe({"model": {"path": "reference-teacher"}, "importance": {"estimator": "wanda_sp"},
                          "prune": {"target": {"ratio": 0.5}, "learn": {"steps": 5, "init": "scores"}},
                          "train": {"steps": 5}})
    assert ok.importance.estimator == "wanda_sp"


def test_llama3_8b_recipe_target_is_the_llama32_3b_shape(tmp_path):
    """recipes/llama3-8b/shearing-3b.yaml on Llama-3-8B's config (meta device, no weights): the target is the
    3.2-3B shape in mask units, stock-loadable, and its parameter count is the closed form."""
    import yaml
    from transformers import LlamaConfig

    from shear.analyze import analyze_path
    from shear.config import validate_recipe
    from shear.shearing.learn import target_of
    from shear.shearing.target import count_params

    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False).save_pretrained(tmp_path)
    from pathlib import Path

    recipe = validate_recipe(yaml.safe_load((Path(__file__).parents[1] / "recipes/llama3-8b/shearing-3b.yaml").read_text()))
    graph = analyze_path(tmp_path, heads=recipe.prune.heads)
    shapes = graph.meta["shapes"]
    target = target_of(recipe.prune, graph, shapes)
    assert target == {"layers": 28, "heads": 3, "mlp": 8192, "hidden": 3072}  # 3 of 4 query heads per KV group
    d, v, f, L = 3072, 128256, 8192, 28
    per_layer = d * 24 * 128 + 2 * d * 8 * 128 + 24 * 128 * d + 3 * d * f + 2 * d
    assert count_params(graph, shapes, target) == 2 * v * d + L * per_layer + d
