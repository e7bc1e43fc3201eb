"""The two export forms of a sparsified model (shear.sparse.export) and ``shear sparsify``.

OUT/compressed, read back with the compressed-tensors library, gives the masked weights bit for bit;
OUT/model, reloaded by plain ``from_pretrained`` in a FRESH process, gives identical outputs with no
missing or unexpected keys.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import ONE_THREAD
from families import family_model, outputs
from shear.sparse import SparsifyConfig
from shear.sparse.export import load_compressed
from shear.sparse.pipeline import export_sparse, run_sparsify

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CASES = [  # family, method, target, compressed format
    ("llama", "wanda", dict(sparsity=0.5), "sparse-bitmask"),
    ("gemma", "sparsegpt", dict(pattern="2:4"), "sparse-24-bitmask"),  # tied LM head
    ("gpt2", "magnitude", dict(pattern="4:8"), "sparse-bitmask"),  # Conv1D
    ("bert", "sparsegpt", dict(sparsity=0.6), "sparse-bitmask"),  # encoder, no LM head
]

RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM
    root, bad = sys.argv[1], []
    ids = load_file(root + "/ids.safetensors")["ids"]
    for c in json.load(open(root + "/cases.json")):
        cls = AutoModelForCausalLM if c["causal"] else AutoModel
        m, info = cls.from_pretrained(root + "/" + c["dir"], output_loading_info=True)
        keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        with torch.no_grad():
            o = m.eval()(input_ids=ids)
        got = (o.logits if c["causal"] else o.last_hidden_state).float()
        if keys or not torch.equal(got, load_file(root + "/" + c["dir"] + "/expected.safetensors")["out"]):
            bad.append((c["dir"], keys, "outputs differ"))
    print(json.dumps(bad))
""")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_forms_round_trip(tmp_path):
    cases = []
    for i, (fam, method, target, fmt) in enumerate(CASES):
        model = family_model(fam)
        cfg = SparsifyConfig(method=method, batch_size=2, **target)
        model, report = run_sparsify(model, None, cfg, ids=CALIB)
        rec = export_sparse(model, report, cfg, tmp_path / f"c{i}" / "model", tmp_path / f"c{i}" / "compressed")
        assert rec["compressed"]["format"] == fmt
        qc = json.loads((tmp_path / f"c{i}" / "compressed" / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["sparsity_config"]["format"] == fmt
        # the compressed form, decompressed by the library, is the masked model bit for bit
        back, info = load_compressed(tmp_path / f"c{i}" / "compressed")
        assert info == {"missing_keys": [], "unexpected_keys": []}, (fam, info)
        want, got = model.state_dict(), back.state_dict()
        assert want.keys() == got.keys()
        diff = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
        assert not diff, (fam, diff[:3])
        assert torch.equal(outputs(back, IDS), outputs(model, IDS))
        if fam != "gpt2":  # Conv1D 4:8 is stored in bitmask too, so only GPT-2 is allowed to grow
            assert rec["compressed"]["bytes"]["weights"] < rec["model"]["bytes"]["weights"], (fam, rec)
        save_file({"out": outputs(model, IDS)}, tmp_path / f"c{i}" / "model" / "expected.safetensors")
        cases.append({"dir": f"c{i}/model", "causal": fam != "bert"})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    save_file({"ids": IDS}, tmp_path / "ids.safetensors")
    run = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_2_4_keeps_conv1d_dense_with_a_warning(tmp_path, caplog):
    model = family_model("gpt2")
    cfg = SparsifyConfig(method="magnitude", pattern="2:4")
    model, report = run_sparsify(model, None, cfg)
    caplog.set_level("WARNING", logger="shear")
    rec = export_sparse(model, report, cfg, tmp_path / "model", tmp_path / "compressed")
    assert rec["compressed"]["dense"] == report["pruned"] and "stay dense" in caplog.text
    back, info = load_compressed(tmp_path / "compressed")
    assert not info["missing_keys"] and all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_cli_sparsify_writes_both_forms_and_a_report(tiny_lm_dir, tiny_text, tmp_path):
    from shear.cli import main
    from shear.models import load_model

    out, text = tmp_path / "out", tmp_path / "calib.txt"
    text.write_text(tiny_text)  # a small text: tokenizing the whole shipped corpus takes seconds
    assert main(["sparsify", str(tiny_lm_dir), "--method", "sparsegpt", "--pattern", "2:4", "--n-samples", "4",
                 "--seq-len", "32", "--source", str(text), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sparsegpt" and report["pattern"] == "2:4" and report["calibration"] == [4, 32]
    assert str(text) in report["calibration_text"]
    assert len(report["plan"]) == 2 and all(layer["linears"] for layer in report["plan"])
    assert all("rel_error" in r for layer in report["plan"] for r in layer["linears"].values())
    ex = report["export"]
    assert ex["compressed"]["format"] == "sparse-24-bitmask"
    assert ex["model"]["bytes"]["weights"] > ex["compressed"]["bytes"]["weights"] > 0
    dense = load_model(str(out / "model"))
    back, info = load_compressed(out / "compressed")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in dense.state_dict().items())
    assert (out / "model" / "shear_recipe.yaml").exists() and (out / "compressed" / "tokenizer.json").exists()
    # a second run into the same OUT refuses, unless --overwrite
    args = ["sparsify", str(tiny_lm_dir), "--method", "magnitude", "--sparsity", "0.5", "-o", str(out)]
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["method"] == "magnitude"
    with pytest.raises(SystemExit):  # neither --sparsity nor --pattern
        main(["sparsify", str(tiny_lm_dir), "--method", "wanda", "-o", str(out)])


@pytest.mark.parametrize("flag", [["--source", "calib.txt"], ["--n-samples", "4"], ["--seq-len", "32"]])
def test_cli_sparsify_magnitude_refuses_calibration_flags(tmp_path, capsys, flag):
    """magnitude needs no text: a calibration flag with it is a one-line error before any model is loaded
    (the model path here does not exist), not a silently ignored option."""
    from shear.cli import main

    assert main(["sparsify", str(tmp_path / "no-model"), "--method", "magnitude", "--sparsity", "0.5",
                 "-o", str(tmp_path / "out")] + flag) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"shear: error: {flag[0]}: magnitude uses no calibration text; drop {flag[0]}"
    assert not (tmp_path / "out").exists()


def test_compressed_form_of_a_per_layer_export(tmp_path):
    """A model pruned to different widths per layer exports with shear's modeling file; its compressed form
    is rebuilt only with consent (one line without), and then equals the sparsified model bit for bit."""
    from shear.analyze import PrunePlan, analyze
    from shear.prune import prune_

    model = family_model("llama")
    prune_(model, PrunePlan({"layers.0.mlp_channel": [0, 1, 2, 3, 4]}), analyze(model))  # layer 0 narrower
    cfg = SparsifyConfig(method="wanda", sparsity=0.5, batch_size=2)
    model, report = run_sparsify(model, None, cfg, ids=CALIB)
    export_sparse(model, report, cfg, tmp_path / "model", tmp_path / "compressed")
    assert "auto_map" in json.loads((tmp_path / "compressed" / "config.json").read_text())
    with pytest.raises(ValueError, match="per-layer pruned export.*--trust-remote-code"):
        load_compressed(tmp_path / "compressed")
    back, info = load_compressed(tmp_path / "compressed", trust_remote_code=True)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(outputs(back, IDS), outputs(model, IDS))
