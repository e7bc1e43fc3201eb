"""Sparsifying a causal LM that no Family entry describes: its blocks, block inputs and linears are found
by structure (shear.importance.calibrate.decoder_layers, shear.sparse.sequential.select_linears).

Gemma 3 (q/k norms, sandwich norms, sliding-window layers with their own mask and rotary embeddings,
final logit soft-capping) is sparsified with its family entry removed, exported in the dense form and
reloaded in a FRESH process with identical logits; a Llama registered under a new model_type gives
bit-for-bit the weights the Llama family path gives; each block is calibrated with its own kwargs.
"""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import ONE_THREAD
from families import family_model, outputs
from shear.analyze import families as fams
from shear.sparse import SparsifyConfig, sparsify_
from shear.sparse import sequential
from shear.sparse.pipeline import export_sparse, run_sparsify

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    root, bad = sys.argv[1], []
    ids = load_file(root + "/ids.safetensors")["ids"]
    for d in json.load(open(root + "/cases.json")):
        m, info = AutoModelForCausalLM.from_pretrained(root + "/" + d, output_loading_info=True)
        keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        with torch.no_grad():
            got = m.eval()(input_ids=ids).logits.float()
        if keys or not torch.equal(got, load_file(root + "/" + d + "/expected.safetensors")["out"]):
            bad.append((d, type(m).__name__, keys, "outputs differ"))
    print(json.dumps(bad))
""")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_gemma3_family(monkeypatch):
    monkeypatch.delitem(fams.FAMILIES, "gemma3_text", raising=False)


def block_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def test_gemma3_sparsified_by_structure_reloads_identically(tmp_path, no_gemma3_family):
    cases = []
    for method, target in (("wanda", dict(sparsity=0.5)), ("sparsegpt", dict(pattern="2:4"))):
        model = family_model("gemma3_text", num_key_value_heads=1)  # 4 query heads share 1 KV head
        assert fams.family_of(model) is None
        before = outputs(model, IDS)
        cfg = SparsifyConfig(method=method, batch_size=2, **target)
        model, report = run_sparsify(model, None, cfg, ids=CALIB)
        assert report["pruned"] == block_linears(model) and len(report["pruned"]) == 14
        assert [p["layer"] for p in report["plan"]] == [0, 1]
        for name in report["pruned"]:
            zeros = float((model.get_submodule(name).weight == 0).float().mean())
            assert 0.5 <= zeros <= (0.5 if method == "wanda" else 0.6), (method, name, zeros)
        assert all(m.weight.count_nonzero() == m.weight.numel() for m in model.modules()
                   if isinstance(m, nn.Module) and type(m).__name__ == "Gemma3RMSNorm")  # norms untouched
        after = outputs(model, IDS)
        assert torch.isfinite(after).all() and not torch.equal(after, before)
        d = f"{method}/model"
        export_sparse(model, report, cfg, tmp_path / d, None)
        save_file({"out": after.contiguous()}, str(tmp_path / d / "expected.safetensors"))
        cases.append(d)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    run = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("by_structure", [True, False])
def test_an_unknown_model_type_matches_the_family_path_bit_for_bit(by_structure, monkeypatch):
    """A Llama registered under a new model_type (tests/families.py) is found by structure, as the llama
    template (shear.analyze.structure) or, with that match disabled, as bare decoder blocks; Wanda and
    SparseGPT give it exactly the weights they give the same Llama through the family table."""
    from transformers import AutoModelForCausalLM

    from families import MyTestLlamaConfig, MyTestLlamaForCausalLM
    from shear.analyze import structure

    if not by_structure:
        monkeypatch.setattr(structure, "match_llama", lambda model, llama: (None, "disabled"))
    for method in ("wanda", "sparsegpt"):
        ref = family_model("llama")
        cfg = MyTestLlamaConfig(**{k: v for k, v in ref.config.to_dict().items() if k != "model_type"})
        mine = AutoModelForCausalLM.from_config(cfg).eval()
        assert type(mine) is MyTestLlamaForCausalLM and "mytestllama" not in fams.FAMILIES
        assert (fams.family_of(mine) is not None) == by_structure
        mine.load_state_dict(ref.state_dict())
        scfg = SparsifyConfig(method=method, sparsity=0.5, batch_size=2)
        got, want = sparsify_(mine, scfg, CALIB), sparsify_(ref, scfg, CALIB)
        assert got.pruned == want.pruned == block_linears(ref)
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in mine.state_dict().items()), method


@pytest.mark.parametrize("fam", ["gemma2", "gemma3_text"])
def test_each_block_is_calibrated_with_its_own_mask(fam, monkeypatch, no_gemma3_family):
    """Block 1 is a full-attention layer after a sliding-window one (window 4 < 16 tokens): the statistics
    of every linear of block 1 are those of the model with block 0 pruned and block 1 dense."""
    seen = {}
    real = sequential._prune_linear

    def spy(name, mod, cfg, sparsity, stat, conv1d):
        seen[name] = stat.clone()
        return real(name, mod, cfg, sparsity, stat, conv1d)

    monkeypatch.setattr(sequential, "_prune_linear", spy)
    model = family_model(fam)
    dense = copy.deepcopy(model.state_dict())
    sparsify_(model, SparsifyConfig(method="wanda", sparsity=0.5, batch_size=2), CALIB)
    model.load_state_dict({k: dense[k] if k.startswith("model.layers.1.") else v for k, v in model.state_dict().items()})
    acc, handles = {}, []
    for name in [n for n in block_linears(model) if ".layers.1." in n]:
        def hook(_m, i, _o, name=name):
            acc[name] = acc.get(name, 0) + (i[0].double() ** 2).sum((0, 1))
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for b in CALIB.split(2):
            model(input_ids=b)
    for h in handles:
        h.remove()
    assert len(acc) == 7
    for name, want in acc.items():
        torch.testing.assert_close(seen[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_model_without_a_block_stack_is_refused_in_one_line():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "flat"})()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"^Flat: no decoder blocks found \(no nn.ModuleList"):
        sparsify_(Flat(), SparsifyConfig(method="magnitude", sparsity=0.5))


def test_cli_sparsifies_a_gemma3_directory(tiny_lm_dir, tiny_text, tmp_path, no_gemma3_family):
    """``shear sparsify`` on a saved Gemma 3 (the tokenizer of the tiny Llama beside it)."""
    from transformers import AutoTokenizer

    from shear.cli import main
    from shear.models import load_model

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    src, out, text = tmp_path / "gemma3", tmp_path / "out", tmp_path / "calib.txt"
    family_model("gemma3_text", vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id).save_pretrained(src)
    tok.save_pretrained(src)
    text.write_text(tiny_text)
    assert main(["sparsify", str(src), "--method", "sparsegpt", "--pattern", "2:4", "--n-samples", "4",
                 "--seq-len", "16", "--source", str(text), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["pruned"]) == 14 and report["pruned_sparsity"] == 0.5
    dense = load_model(str(out / "model"))
    assert type(dense).__name__ == "Gemma3ForCausalLM"
    assert all((dense.get_submodule(n).weight == 0).float().mean() == 0.5 for n in report["pruned"])
