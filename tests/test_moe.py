"""Expert pruning of mixture-of-experts models (shear/importance/experts.py, shear/prune/experts.py): stock
routing replayed, statistics against brute force, sliced == masked (router logits at -inf), stock exports
reloaded in a fresh process, the CLI. Tiny models: 2 layers, hidden 64, 8 experts, top-2."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from conftest import ONE_THREAD
from shear.importance.experts import (accumulate_, collect_expert_stats, expert_scores, find_moe_blocks, route,
                                      ExpertStats)
from shear.prune.experts import (ExpertPruneConfig, experts_to_remove, kept_experts, prune_experts_,
                                 remove_experts_)

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128, use_cache=False, num_experts_per_tok=2)
#: name -> (config class, kwargs); qwen3_moe/olmoe with and without norm_topk_prob, qwen3 with a dense layer
MOE = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=32, intermediate_size=48, num_experts=8)),
    "qwen3_moe_norm_dense0": ("Qwen3MoeConfig", dict(moe_intermediate_size=32, intermediate_size=48, num_experts=8,
                                                     norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=32, intermediate_size=48, num_experts=8,
                                         shared_expert_intermediate_size=48)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8)),
    "olmoe_norm": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, norm_topk_prob=True)),
}


def moe_model(name: str, std: float = 0.2, **over):
    """A tiny MoE causal LM in eval mode, every parameter from N(0, std) (routers too: Qwen's start at zero)."""
    import transformers

    cls, kw = MOE[name]
    cfg = getattr(transformers, cls)(**dict(COMMON, **kw, **over))
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@contextmanager
def masked(model, drop: dict[int, list[int]]):
    """The model with the router logits of ``drop[layer]`` at -inf (the stock router code otherwise untouched)."""
    masks = {}
    for b in find_moe_blocks(model):
        m = torch.zeros(b.num_experts)
        m[drop.get(b.layer, [])] = float("-inf")
        masks[id(b.router.weight)] = m
    linear = F.linear

    def patched(x, w, bias=None):
        y = linear(x, w, bias)
        return y + masks[id(w)] if id(w) in masks else y

    F.linear = patched
    try:
        yield model
    finally:
        F.linear = linear


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MOE))
def test_route_replays_the_stock_router(name):
    model = moe_model(name)
    x = torch.randn(40, 64)
    for b in find_moe_blocks(model):
        with torch.no_grad():
            _, w, idx = b.router(x)
            ref_w, ref_idx = route(F.linear(x, b.router.weight), b.top_k, b.normalize)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(w.float(), ref_w)
    assert find_moe_blocks(model)[0].normalize == (name in ("mixtral", "qwen3_moe_norm_dense0", "olmoe_norm"))


def test_dense_layers_and_shared_experts_are_not_experts():
    assert [b.layer for b in find_moe_blocks(moe_model("qwen3_moe_norm_dense0"))] == [1]
    q2 = moe_model("qwen2_moe")
    assert all(b.num_experts == 8 and "shared" not in b.path for b in find_moe_blocks(q2))


def test_unsupported_family_and_storage_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="expert pruning supports"):
        find_moe_blocks(tiny_llama)
    model = moe_model("mixtral")
    model.model.layers[1].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(8)])
    with pytest.raises(ValueError, match="not fused gate_up_proj"):
        find_moe_blocks(model)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe_norm_dense0"])
def test_statistics_equal_brute_force(name):
    """count = the stock router's top-k hits; drop_err[e] = sum ||block with e masked - block||^2."""
    model = moe_model(name)
    b = find_moe_blocks(model)[-1]
    x = torch.randn(2, 30, 64)
    s = ExpertStats.zeros(b.num_experts, b.top_k)
    with torch.no_grad():
        accumulate_(s, x.reshape(-1, 64), F.linear(x.reshape(-1, 64), b.router.weight), b.experts, b.normalize)
        _, _, idx = b.router(x.reshape(-1, 64))
        y = b.block(x)
        for e in range(b.num_experts):
            with masked(model, {b.layer: [e]}):
                ye = b.block(x)
            torch.testing.assert_close(s.drop_err[e].float(), (ye - y).pow(2).sum(), rtol=1e-4, atol=1e-5)
    assert torch.equal(s.count, torch.bincount(idx.reshape(-1), minlength=b.num_experts).double())
    assert s.drop_err.min() >= 0 and s.drop_err.max() > 0 and s.tokens == 60


def test_criteria_on_hand_statistics():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    s = ExpertStats(count=t(4.0, 0.0, 2.0), weight_sum=t(2.0, 0.0, 1.8), norm_sum=t(8.0, 0.0, 1.0),
                    drop_err=t(3.0, 0.0, 1.0),
                    out_sqsum=10.0, tokens=3, top_k=2)
    sc = expert_scores({0: s}, "frequency")[0]
    torch.testing.assert_close(sc, torch.tensor([4 / 3, 0.0, 2 / 3], dtype=torch.float64))
    sc = expert_scores({0: s}, "weighted")[0]  # freq * mean weight * mean norm
    torch.testing.assert_close(sc, torch.tensor([4 / 3 * 0.5 * 2.0, 0.0, 2 / 3 * 0.9 * 0.5], dtype=torch.float64))
    torch.testing.assert_close(expert_scores({0: s}, "reconstruction")[0],
                               torch.tensor([0.3, 0.0, 0.1], dtype=torch.float64))
    r1, r2 = expert_scores({0: s}, "random", seed=1)[0], expert_scores({0: s}, "random", seed=2)[0]
    assert torch.equal(r1, expert_scores({0: s}, "random", seed=1)[0]) and not torch.equal(r1, r2)
    assert kept_experts(torch.tensor([0.3, 0.0, 0.1, 0.1]), 2) == [0, 2]  # tie: the lower index stays
    with pytest.raises(ValueError, match="criterion"):
        expert_scores({0: s}, "magnitude")


def test_removal_counts_are_refused_when_they_do_nothing_or_too_much():
    assert [experts_to_remove(8, r, 2) for r in (0.25, 0.3, 0.5)] == [2, 2, 4]
    with pytest.raises(ValueError, match="removes no expert"):
        experts_to_remove(8, 0.1, 2)
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok"):
        experts_to_remove(4, 0.75, 2)


@pytest.mark.parametrize("name", list(MOE))
def test_sliced_equals_masked(name):
    model = moe_model(name)
    layers = [b.layer for b in find_moe_blocks(model)]
    drop = {layer: [1, 4] if i % 2 == 0 else [0, 7] for i, layer in enumerate(layers)}
    before = logits(model, IDS)
    with masked(model, drop):
        ref = logits(model, IDS)
    assert (ref - before).abs().max() > 1e-3  # the dropped experts were routed to: not vacuous
    remove_experts_(model, {layer: [e for e in range(8) if e not in d] for layer, d in drop.items()})
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)
    cfg = model.config
    assert cfg.num_experts == 6 and all(b.num_experts == 6 for b in find_moe_blocks(model))
    assert all(b.router.weight.shape[0] == 6 and b.experts.gate_up_proj.shape[0] == 6 for b in find_moe_blocks(model))


def test_uneven_or_too_few_kept_experts_are_refused():
    model = moe_model("mixtral")
    with pytest.raises(ValueError, match="differ across layers"):
        remove_experts_(model, {0: [0, 1, 2], 1: [0, 1]})
    with pytest.raises(ValueError, match="fewer than top_k"):
        remove_experts_(model, {0: [0], 1: [3]})
    with pytest.raises(ValueError, match="sparse layers are"):
        remove_experts_(model, {0: [0, 1]})


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for d in sys.argv[1:]:
    m, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    ids = torch.load(d + "/ids.pt")
    with torch.no_grad():
        torch.save(m.eval()(input_ids=ids).logits, d + "/logits.pt")
    out[d] = {"class": type(m).__name__, "missing": sorted(info["missing_keys"]),
              "unexpected": sorted(info["unexpected_keys"])}
print(json.dumps(out))
"""


def test_exports_reload_as_the_stock_class_in_a_fresh_process(tmp_path):
    from shear.prune.export import export

    dirs, ref = [], {}
    for name in ("mixtral", "qwen3_moe_norm_dense0", "qwen2_moe", "olmoe"):
        model = moe_model(name)
        report = prune_experts_(model, None, ExpertPruneConfig(ratio=0.25, criterion="reconstruction"), ids=IDS)
        assert report["experts_after"] == 6 and all(len(v["kept"]) == 6 for v in report["layers"].values())
        d = str(export(model, tmp_path / name))
        torch.save(IDS, d + "/ids.pt")
        dirs.append(d)
        ref[d] = (logits(model, IDS), type(model).__name__)
        cfg = json.loads(open(d + "/config.json").read())
        assert "auto_map" not in cfg and "shear_layout" not in cfg
    check_reloads(dirs, ref)



def check_reloads(dirs: list[str], ref: dict) -> None:
    """Each export in ``dirs`` reloaded by plain from_pretrained in a fresh process (:data:`RELOAD`, at one
    thread): its class ``ref[d][1]``, no missing or unexpected keys, the logits ``ref[d][0]`` bit for bit."""
    r = subprocess.run([sys.executable, "-c", RELOAD, *dirs], capture_output=True, text=True, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for d in dirs:
        assert got[d] == {"class": ref[d][1], "missing": [], "unexpected": []}
        assert torch.equal(torch.load(d + "/logits.pt"), ref[d][0])


def saved_moe(path, family: str, text: str):
    """A tiny ``family`` MoE saved at ``path`` with a BPE tokenizer (vocabulary 300) trained on ``text``."""
    from shear.data.tokenizer import train_bpe

    tok = train_bpe([text], vocab_size=300)
    moe_model(family, vocab_size=len(tok), max_position_embeddings=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path

def test_collect_runs_the_model_once_per_batch():
    model = moe_model("olmoe")
    stats = collect_expert_stats(model, IDS, batch_size=2)
    assert sorted(stats) == [0, 1] and all(s.tokens == IDS.numel() for s in stats.values())
    assert all(s.count.sum() == 2 * IDS.numel() for s in stats.values())  # top-2 of every token


def test_cli_prunes_experts_and_reports(tmp_path, tiny_text, capsys):
    from shear.cli import main

    src = saved_moe(tmp_path / "src", "qwen3_moe", tiny_text)
    out = tmp_path / "out"
    argv = ["prune", str(src), "--experts", "0.5", "--expert-criterion", "frequency", "--calib", "shakespeare",
            "--n-samples", "4", "--seq-len", "32", "-o", str(out)]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["experts_after"] == 4 and rep["criterion"] == "frequency" and rep["calibration_text"]
    for layer in rep["layers"].values():
        top = sorted(range(8), key=lambda e: (-layer["scores"][e], e))[:4]
        assert layer["kept"] == sorted(top) and len(layer["scores"]) == 8
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").num_experts == 4
    capsys.readouterr()
    assert main(argv) != 0 and "pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--ratio", "0.5"]) != 0
    assert "--ratio: width pruning does not combine with --experts" in capsys.readouterr().err
    assert main(argv[:2] + ["--expert-criterion", "random", "-o", str(tmp_path / "o2")]) != 0
    assert "only with --experts" in capsys.readouterr().err
