"""The family matrix: every family x estimator x structure x allocation, pruned, exported, and reloaded
in a FRESH process with plain ``from_pretrained`` (``trust_remote_code=True`` only where the export
says so through ``auto_map``) must give exactly the in-memory pruned model's outputs, with no missing,
unexpected or mismatched keys. Also per case: uniform plans export as the stock class (except heads /
hidden on GPT-2, OPT and BERT, whose stock code derives head_dim from hidden // heads); the parameter
count meets the target with the compensation biases counted; no all-zero bias is added where the
stock class does not need one; compensation that a stock export cannot hold is reported as skipped.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from families import FAMILIES, GQA, STRUCTURES, family_model, outputs
from shear.importance import ESTIMATORS
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune

WIDTH_ESTIMATORS = ("magnitude_l1", "magnitude_l2", "taylor_vector", "taylor_element1", "taylor_element2",
                    "wanda_sp", "flap", "flap_original", "minitron", "random", "obs")
LAYER_ESTIMATORS = ("block_influence", "angular", "magnitude_l1", "taylor_vector", "random")
HEAD_DIM_FROM_HIDDEN = ("gpt_neox", "gpt2", "opt", "bert")
RATIO = {"heads": 0.1, "heads_q": 0.1, "mlp": 0.2, "hidden": 0.2, "layers": 0.3, "default": 0.3}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_estimator_is_in_the_matrix():
    """A new estimator cannot land without the matrix covering it (loraprune needs LoRA training)."""
    assert set(ESTIMATORS) - {"loraprune"} <= set(WIDTH_ESTIMATORS) | set(LAYER_ESTIMATORS)


#: families whose full estimator cross-product runs only under ``-m slow`` (CI time): estimators see
#: groups, not families, so the default run gives each of them one estimator per structure (REPRESENTATIVE)
#: with the same export / fresh-process reload invariants.
LIGHT = ("mytestllama", "olmo2", "granite", "smollm3", "cohere", "starcoder2", "gpt_neox", "phi", "falcon")


def representative(fam):
    """One estimator per structure; the allocations alternate so both exports (stock, per-layer) run."""
    yield from _supported(fam, _representative(fam))


def _representative(fam):
    yield from (("flap", "heads", "uniform"), ("flap", "mlp", "global"), ("flap", "hidden", "uniform"))
    if fam in GQA:
        yield "flap", "heads_q", "global"
    yield "block_influence", "layers", "global"
    yield "obs", "default", "balanced"  # shear prune's default
    if fam in STRUCTURES:  # both exports of what the family supports
        yield "flap", "mlp", "uniform"


def _supported(fam, todo):
    """The cases whose structures the family supports (the others are refused: tests/test_slice_families.py)."""
    allowed = STRUCTURES.get(fam)
    for est, struct, alloc in todo:
        if allowed is None or set({"heads_q": ["heads"], "default": ["heads", "mlp"]}.get(struct, [struct])) <= set(allowed):
            yield est, struct, alloc


def cases(fam):
    yield from _supported(fam, _cases(fam))


def _cases(fam):
    for est in WIDTH_ESTIMATORS:
        for struct in ("heads", "mlp", "hidden") + (("heads_q",) if fam in GQA else ()):
            if struct == "hidden" and "hidden" not in ESTIMATORS[est].kinds:
                continue  # obs scores heads and MLP channels only (hidden is refused: tests/test_obs.py)
            for alloc in ("uniform", "global"):
                yield est, struct, alloc
    for est in LAYER_ESTIMATORS:
        yield est, "layers", "global"
    yield "obs", "default", "balanced"  # shear prune's default: heads + MLP, uniform widths, split by the scores
    yield "flap", "default", "global"  # the old default: heads + MLP, global, FLAP + compensation
    yield "flap", "default", "pool"  # shear's AL-AM: heads and MLP channels in one ranking
    yield "flap_original", "default", "pool"  # FLAP's AL-AM as its code scores (per-layer standardization)
    yield "obs", "default", "global"  # OBS refit of the kept columns + new biases where compensation puts them


def configs(est, struct, alloc):
    structures = {"heads_q": ["heads"], "default": ["heads", "mlp"]}.get(struct, [struct])
    pcfg = PruneConfig(target={"ratio": RATIO[struct]}, structures=structures, allocation=alloc,
                       heads="query_head" if struct == "heads_q" else "kv_group")
    kw = dict(layer_estimator=est) if struct == "layers" else dict(estimator=est)
    return pcfg, ImportanceConfig(n_samples=8, seq_len=16, batch_size=4, **kw)


def expect_stock(fam, struct, alloc):
    if struct == "layers":
        return True
    if alloc == "balanced" and fam in HEAD_DIM_FROM_HIDDEN:
        return None  # stock unless the split it picks removes heads
    if alloc not in ("uniform", "balanced"):
        return None  # per-layer widths: usually the modeling file; a plan may happen to be uniform
    return not (fam in HEAD_DIM_FROM_HIDDEN and struct in ("heads", "hidden"))


RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM
    root = sys.argv[1]
    sys.path.insert(0, sys.argv[2])
    import families  # registers the model_type no family lists (mytestllama), as its user would
    cases = json.load(open(root + "/cases.json"))
    ids = load_file(root + "/ids.safetensors")["ids"]
    bad = []
    for c in cases:
        d = root + "/" + c["dir"]
        remote = "auto_map" in json.load(open(d + "/config.json"))
        cls = AutoModelForCausalLM if c["causal"] else AutoModel
        if remote:  # without consent a per-layer export must refuse to load (never re-initialise weights)
            try:
                cls.from_pretrained(d)
                bad.append((c["dir"], "loaded without trust_remote_code"))
            except Exception:
                pass
        m, info = cls.from_pretrained(d, trust_remote_code=remote, output_loading_info=True)
        keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if keys:
            bad.append((c["dir"], f"loading info {keys}"))
            continue
        with torch.no_grad():
            o = m.eval()(input_ids=ids)
        got = (o.logits if c["causal"] else o.last_hidden_state).float()
        want = load_file(d + "/expected.safetensors")["out"]
        if got.shape != want.shape or not torch.equal(got, want):
            diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
            bad.append((c["dir"], f"outputs differ: {diff}"))
    open(root + "/reload.json", "w").write(json.dumps(bad))
""")


@pytest.mark.parametrize("fam", [pytest.param(f, marks=pytest.mark.slow) if f in LIGHT else f for f in FAMILIES])
def test_family_matrix(fam, tmp_path, caplog):
    _run_matrix([(fam, *c) for c in cases(fam)], tmp_path, caplog)


def test_family_matrix_representative(tmp_path, caplog):
    """The LIGHT families, one estimator per structure, reloaded by one fresh process."""
    _run_matrix([(fam, *c) for fam in LIGHT for c in representative(fam)], tmp_path, caplog)


def _run_matrix(todo, tmp_path, caplog):
    caplog.set_level("WARNING", logger="shear")
    problems, records = [], []
    for i, (fam, est, struct, alloc) in enumerate(todo):
        name = f"{fam} {est}-{struct}-{alloc}"
        model = family_model(fam)
        p0 = sum(p.numel() for p in model.parameters())
        before_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
        pcfg, icfg = configs(est, struct, alloc)
        caplog.clear()
        model, _, rep = run_prune(model, None, pcfg, icfg, ids=CALIB)
        n = sum(p.numel() for p in model.parameters())
        if n != rep["params_after"] or n > int(p0 * (1 - RATIO[struct])):
            problems.append((name, f"params {n} (report {rep['params_after']}) above target {int(p0 * (1 - RATIO[struct]))}"))
        comp = rep["bias_compensation"] or {}
        flags = set(comp.get("flags", []))
        for pn, p in model.named_parameters():
            added = pn.endswith(".bias") and pn not in before_bias
            if added and not flags and not p.detach().abs().sum():
                problems.append((name, f"all-zero bias added without a config flag needing it: {pn}"))
        if comp.get("skipped") and not any("bias compensation skipped" in r.message for r in caplog.records):
            problems.append((name, "compensation skipped without a warning"))
        d = f"c{i}"
        from shear.prune.export import export

        export(model, tmp_path / d)
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        stock, want_stock = "auto_map" not in cfg, expect_stock(fam, struct, alloc)
        if want_stock is not None and stock != want_stock:
            problems.append((name, f"exported {'stock' if stock else 'per-layer'}, expected the other; "
                                   f"layout {cfg.get('shear_layout')}"))
        if not stock and not cfg["model_type"].startswith("shear_"):
            problems.append((name, f"per-layer export keeps model_type {cfg['model_type']!r}"))
        save_file({"out": outputs(model, IDS).contiguous()}, str(tmp_path / d / "expected.safetensors"))
        records.append({"dir": d, "name": name, "causal": fam != "bert"})
    (tmp_path / "cases.json").write_text(json.dumps(records))
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), os.path.dirname(__file__)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {c["dir"]: c["name"] for c in records}
    problems += [(names[d], why) for d, why in json.loads((tmp_path / "reload.json").read_text())]
    assert not problems, "\n".join(f"{n}: {why}" for n, why in problems)


def test_uniform_flap_without_a_bias_slot_skips_and_says_so(caplog):
    """Mistral has no bias on o_proj/down_proj and no flag for one: a uniform (stock) FLAP plan does not
    compensate there, and says so; the global plan (per-layer export) keeps its compensation."""
    caplog.set_level("WARNING", logger="shear")
    model = family_model("mistral")
    _, _, rep = run_prune(model, None, PruneConfig(target={"ratio": 0.2}, structures=["mlp"], allocation="uniform"),
                          ImportanceConfig(n_samples=8, seq_len=16), ids=CALIB)
    assert rep["bias_compensation"]["skipped"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert any("bias compensation skipped" in r.message for r in caplog.records)
    assert all(m.mlp.down_proj.bias is None for m in model.model.layers)
    model = family_model("mistral")
    _, _, rep = run_prune(model, None, PruneConfig(target={"ratio": 0.2}, structures=["mlp"], allocation="global"),
                          ImportanceConfig(n_samples=8, seq_len=16), ids=CALIB)
    assert not rep["bias_compensation"]["skipped"] and rep["bias_compensation"]["compensated"] == 2
    assert all(m.mlp.down_proj.bias.abs().sum() > 0 for m in model.model.layers)


def test_stock_llama_compensation_sets_flags_and_counts_the_zero_biases():
    """Uniform FLAP on Llama exports stock: mlp_bias covers gate/up/down, so gate/up get zero biases;
    the plan counts them, so the 20% target is met with them."""
    model = family_model("llama")
    p0 = sum(p.numel() for p in model.parameters())
    _, _, rep = run_prune(model, None, PruneConfig(target={"ratio": 0.2}, structures=["mlp"], allocation="uniform"),
                          ImportanceConfig(n_samples=8, seq_len=16), ids=CALIB)
    assert rep["bias_compensation"]["flags"] == ["mlp_bias"] and model.config.mlp_bias
    layer = model.model.layers[0].mlp
    assert not layer.gate_proj.bias.any() and layer.down_proj.bias.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) <= int(p0 * 0.8)
    assert rep["removed_ratio"] >= 0.2


def test_per_layer_export_without_modeling_code_fails_by_name(tmp_path):
    """The per-layer export's model_type is its own: transformers refuses it without trust_remote_code,
    and cannot be talked into loading re-initialised weights (ignore_mismatched_sizes)."""
    from transformers import AutoModelForCausalLM

    from shear.analyze.graph import PrunePlan
    from shear.prune import export, prune_

    model = family_model("qwen2")
    prune_(model, PrunePlan({"layers.0.mlp_channel": [1, 2]}))
    out = export(model, tmp_path / "o")
    assert json.loads((out / "config.json").read_text())["model_type"] == "shear_qwen2"
    for kw in ({}, {"ignore_mismatched_sizes": True}):
        with pytest.raises(Exception, match="shear_qwen2|trust_remote_code"):
            AutoModelForCausalLM.from_pretrained(out, **kw)
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert again.config.model_type == "shear_qwen2"
    torch.testing.assert_close(outputs(again, IDS), outputs(model, IDS), atol=0, rtol=0)
    out2 = export(again, tmp_path / "o2")  # a re-export of the reloaded model keeps its stock base
    cfg = json.loads((out2 / "config.json").read_text())
    assert cfg["model_type"] == "shear_qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
