"""A model_type no family lists is recognised by its modules (shear.analyze.structure): a Llama registered as
``mytestllama`` (tests/families.py) gets exactly the llama graph, on real weights and on meta, and goes through
``shear prune`` (heads included) and ``shear sparsify`` to exports a fresh process loads as its own class; a
module that does not fit the llama template is named in one line and the model falls back to torch-pruning.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ONE_THREAD
from families import MyTestLlamaConfig, MyTestLlamaForCausalLM, family_config, family_model
from shear.analyze import analyze, analyze_path
from shear.analyze.families import FAMILIES, family_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_graph(a, b):
    assert [g.name for g in a.groups] == [g.name for g in b.groups]
    assert (a.total_params, a.total_macs) == (b.total_params, b.total_macs)
    for x, y in zip(a.groups, b.groups):
        assert (x.params_per_unit, x.macs_per_unit) == (y.params_per_unit, y.macs_per_unit)
        assert all(torch.equal(m.units, n.units) and m.param == n.param for m, n in zip(x.members, y.members))


def test_an_unlisted_llama_gets_the_llama_graph(tmp_path):
    mine, ref = family_model("mytestllama"), family_model("llama")
    assert "mytestllama" not in FAMILIES and family_of(mine).name == "llama"
    _same_graph(analyze(mine), analyze(ref))
    assert {g.kind for g in analyze(mine, heads="query_head").groups} >= {"query_head", "mlp_channel", "hidden"}
    family_config("mytestllama").save_pretrained(tmp_path)  # config only: recognised on the meta device
    _same_graph(analyze_path(tmp_path), analyze(ref))


def _misfit(change):
    model = family_model("mytestllama")
    change(model)
    assert family_of(model) is None
    return analyze(model)


@pytest.mark.parametrize("change,named", [
    (lambda m: setattr(m.model.layers[1], "post_attention_layernorm", nn.LayerNorm(64)),
     "model.layers.1.post_attention_layernorm: LayerNorm is not an RMSNorm with ε = config.rms_norm_eps"),
    (lambda m: setattr(m.model.layers[0].self_attn, "gate", nn.Linear(64, 1)),
     "model.layers.0.self_attn.gate: not part of the llama template"),
    (lambda m: setattr(m.model, "norm", __import__("transformers").models.gemma.modeling_gemma.GemmaRMSNorm(64, 1e-6)),
     "model.norm: GemmaRMSNorm does not compute x / rms(x) * w"),  # 1+w: would need Gemma's embedding scale
])
def test_a_module_that_does_not_fit_is_named(change, named, caplog):
    """Not Llama-shaped: the torch-pruning fallback (MLP channels, hidden refused, layers), and a heads target
    says in one line which module did not fit."""
    from shear.prune.config import PruneConfig
    from shear.prune.plan import build_plan

    g = _misfit(change)
    assert g.family == "torch_pruning:mytestllama" and g.meta["misfit"] == named
    scores = {x.name: torch.rand(x.num_units) for x in g.groups}
    with caplog.at_level("WARNING", logger="shear"):
        build_plan(g, scores, PruneConfig(target={"ratio": 0.05}, structures=["heads", "mlp"]), g.meta["shapes"])
    lines = [r.getMessage() for r in caplog.records if "no heads groups" in r.getMessage()]
    assert len(lines) == 1 and named in lines[0] and "\n" not in lines[0]


RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, sys.argv[2])
    import families  # the user registers their model_type; nothing of shear is imported
    out = []
    for d in sys.argv[3:]:
        m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/" + d, output_loading_info=True)
        with torch.no_grad():
            logits = m.eval()(input_ids=torch.arange(2, 14).view(2, 6)).logits
        out.append([type(m).__name__, {k: v for k, v in info.items() if v and k != "error_msgs"},
                    logits.flatten()[:8].tolist()])
    print(json.dumps(out))
""")


def test_cli_prunes_heads_and_sparsifies_an_unlisted_llama(tiny_lm_dir, tiny_text, tmp_path):
    """``shear prune --structures heads`` removes KV groups of a ``mytestllama`` checkpoint (the fallback had
    none to offer) and ``shear sparsify`` zeroes its block linears; both exports load in a fresh process as
    ``MyTestLlamaForCausalLM`` with every key in place and the logits this process gets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shear.cli import main

    src = tmp_path / "src"
    llama = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mine = MyTestLlamaForCausalLM(MyTestLlamaConfig(**{k: v for k, v in llama.config.to_dict().items()
                                                       if k != "model_type"}))
    mine.load_state_dict(llama.state_dict())
    mine.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(src)
    (tmp_path / "calib.txt").write_text(tiny_text)
    calib = ["--calib", str(tmp_path / "calib.txt"), "--n-samples", "4", "--seq-len", "32"]
    assert main(["prune", str(src), "--ratio", "0.1", "--structures", "heads", "-o", str(tmp_path / "p")] + calib) == 0
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["widths_before"]["kv_heads"] == [2, 2] and sum(rep["widths_after"]["kv_heads"]) < 4
    assert main(["sparsify", str(src), "--method", "wanda", "--sparsity", "0.5", "--source", str(tmp_path / "calib.txt"),
                 "--n-samples", "4", "--seq-len", "32", "-o", str(tmp_path / "s")]) == 0
    dirs = ["p/model", "s/model"]
    run = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), str(Path(__file__).parent), *dirs],
                         env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for d, (cls, info, logits) in zip(dirs, got):
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert cfg["model_type"] == "mytestllama" and cls == "MyTestLlamaForCausalLM" and not info, (d, cls, info)
        here = AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()
        with torch.no_grad():
            want = here(input_ids=torch.arange(2, 14).view(2, 6)).logits.flatten()[:8]
        assert torch.equal(torch.tensor(logits), want), d
