"""Every shipped recipe runs end to end with ``shear run RECIPE --smoke`` (a few steps and samples).

Recipes that start from a pretrained model get a tiny Llama saved to disk; recipes that build one
from scratch get a tiny architecture; both read a tiny corpus. Whatever each recipe's stages are, the
run must finish, write its resolved recipe, and export a model that reloads with the PPL it had in memory.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
TINY_ARCH = dict(hidden_size=32, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    from shear.data.corpus import load_corpus

    text = load_corpus("validation")[0]["text"][:60_000]
    for i in range(6):
        (d / f"part{i}.txt").write_text(text[i * 10_000:(i + 1) * 10_000])
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, corpus):
    from transformers import LlamaForCausalLM

    from shear.data.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("tiny")
    tok = train_bpe([p.read_text() for p in sorted(corpus.iterdir())], vocab_size=300)
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=len(tok), **TINY_ARCH, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def stand_ins(data: dict, tiny_dir: Path, corpus: Path) -> list[str]:
    """What --smoke cannot know: the tiny model and corpus stand in for the recipe's, at lengths they fit."""
    ov = [f"data.source={corpus}", "data.seq_len=32", "data.validation_fraction=0.34"]
    if data["model"].get("init") == "scratch":
        ov += [f"model.arch={yaml.safe_dump(TINY_ARCH, default_flow_style=True).strip()}", "model.tokenizer_vocab=300"]
    else:
        ov += [f"model.path={tiny_dir}"]
        if data.get("distill", {}) and data["distill"].get("teacher"):
            ov += [f"distill.teacher={tiny_dir}"]
    if "prune" in data and "learn" in data["prune"]:  # learned masks: no importance section
        ov += ["prune.round_to=1"]
        if "shape" in data["prune"]["target"]:  # a real model's shape, scaled to the tiny model (4 layers, 32 wide)
            ov += [f"prune.target.shape.{k}={v}" for k, v in dict(
                num_hidden_layers=3, hidden_size=24, intermediate_size=192, num_attention_heads=4,
                num_key_value_heads=2).items()]
    elif "prune" in data:
        ov += ["importance.seq_len=16", f"importance.source={corpus}", "prune.round_to=1"]
    if "eval" in data:
        ov += ["eval.seq_len=32", f"eval.dataset={corpus / 'part0.txt'}", "eval.dataset_config=null", "eval.split=validation"]
    return ov


def shrink(data: dict, tiny_dir: Path, corpus: Path, out: Path) -> list[str]:
    """``stand_ins`` plus tiny amounts as overrides, for tests that call ``run_recipe`` directly."""
    ov = stand_ins(data, tiny_dir, corpus)
    if "train" in data:
        ov += ["train.steps=3", "train.warmup_steps=0", "train.batch_size=2", "train.eval_batches=1",
               "train.eval_every=1", "train.save_every=1"]
    if "prune" in data and "learn" in data["prune"]:
        ov += ["prune.learn.steps=3", "prune.learn.warmup=1"]
    elif "prune" in data:
        ov += ["importance.n_samples=2"]
    if "eval" in data:
        ov += ["eval.speed=false", "eval.max_windows=2"]
    if "export" in data:
        ov += [f"export.dir={out / 'model'}"]
    return ov


def test_smoke_shrinks_amounts_not_stages():
    from shear.config import load_recipe, smoke_recipe

    for path in RECIPES:
        full = load_recipe(path)
        smoke = smoke_recipe(full)
        assert smoke.output_dir == full.output_dir + "-smoke"
        assert [s for s in ("prune", "train", "distill", "export", "eval") if getattr(smoke, s) is not None] == \
               [s for s in ("prune", "train", "distill", "export", "eval") if getattr(full, s) is not None]
        if full.train:
            assert smoke.train.steps <= max(3, full.prune.tune_rounds if full.prune else 1)
            assert smoke.train.lora == full.train.lora and smoke.train.precision == full.train.precision
        if full.prune and full.prune.learn:  # learned masks: fewer mask steps, nothing else changes
            assert smoke.importance is None and smoke.prune.learn.steps <= 3
            assert smoke.prune.model_dump(exclude={"learn"}) == full.prune.model_dump(exclude={"learn"})
        elif full.prune:
            assert smoke.importance.n_samples == 2 and smoke.prune == full.prune
        if full.sparsify:
            assert smoke.sparsify.n_samples == 2 and smoke.sparsify.method == full.sparsify.method
        if full.eval:
            assert smoke.eval.max_windows == 2 and smoke.eval.seq_len == full.eval.seq_len
        if full.export:
            assert smoke.export.dir is None, "a smoke run never writes into a shared export directory"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_runs_smoke(path, tiny_dir, corpus, tmp_path):
    from shear.cli import main
    from shear.config import validate_recipe
    from shear.models import load_model

    data = yaml.safe_load(path.read_text())
    run = tmp_path / "run"
    assert main(["run", str(path), *stand_ins(data, tiny_dir, corpus), "--smoke", "-o", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    recipe = validate_recipe(yaml.safe_load((run / "recipe.yaml").read_text()))
    expected = [s for s in ("prune", "sparsify", "train", "export") if s in data]
    assert [s for s in summary["stages"] if s != "eval"] == expected
    if "train" in data:
        assert summary["train"].get("steps", 3) <= 3
    if "export" in data:
        model_dir = Path(summary["model_dir"])
        assert model_dir == run / "model"
        assert (model_dir / "shear_recipe.yaml").exists(), "an export carries the recipe that made it"
        reloaded = load_model(str(model_dir), trust_remote_code=True)  # per-layer exports carry auto_map
        if "eval" in data:  # the reloaded model scores exactly what the in-memory result scored
            from shear.eval.report import evaluate
            from shear.models import load_tokenizer

            again = evaluate(reloaded, load_tokenizer(str(model_dir)), recipe.eval)
            # fp32 exports reload exactly; a bf16 export (llama3-8b recipe) differs by ~1e-4 relative in
            # PPL between the in-memory and the reloaded model (cause not pinned down yet), so bf16 gets 1e-3
            rel = 1e-3 if (recipe.export.dtype or recipe.model.dtype) != "fp32" else 1e-5
            assert again["ppl"] == pytest.approx(summary["eval"]["final"]["ppl"], rel=rel)
            assert again["params"] == summary["eval"]["final"]["params"]
    if "eval" in data:
        final = summary["eval"]["final"]
        assert final["ppl"] > 1.0 and final["params"] > 0
