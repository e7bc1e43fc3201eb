"""What exports cost on disk: written dtype, shards, the fp32 path unchanged (shear.models, shear.storage).

A bf16 checkpoint pruned or sparsified is written in bf16 (safetensors headers, config.json), about the
bf16 size, and reloads in a fresh process with plain ``from_pretrained``; ``--dtype fp32`` writes fp32; a
small shard size gives several shards and an index that load to identical logits; an fp32 checkpoint's
export is byte for byte what ``save_pretrained`` wrote before.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import ONE_THREAD, write_tiny_lm
from families import family_model, outputs
from shear.analyze import PrunePlan
from shear.memory import peak_rss_bytes, trim
from shear.models import cast_weights_, checkpoint_dtype, export_dtype, load_dtype, load_model, load_tokenizer
from shear.prune import export, prune_
from shear.storage import shard_size

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
FLOAT = {"F32", "BF16", "F16"}


def header_dtypes(d: Path) -> set:
    """The floating dtypes in the safetensors headers of every weights file under ``d``."""
    out = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out & FLOAT


def weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_text):
    """A tiny Llama stored in bf16 (config.json says bfloat16) with a BPE tokenizer."""
    return write_tiny_lm(tmp_path_factory.mktemp("bf16_lm"), tiny_text, torch.bfloat16)


RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    root, bad = sys.argv[1], []
    for d in json.loads(sys.argv[2]):
        m, info = AutoModelForCausalLM.from_pretrained(root + "/" + d, output_loading_info=True)
        keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        exp = load_file(root + "/" + d + "/expected.safetensors")
        with torch.no_grad():
            got = m.eval()(input_ids=exp["ids"]).logits
        if keys or m.dtype != torch.bfloat16 or not torch.equal(got, exp["out"]):
            bad.append((d, keys, str(m.dtype)))
    print(json.dumps(bad))
""")


def test_bf16_checkpoint_is_written_in_bf16(bf16_dir, tiny_text, tmp_path):
    from shear.cli import main
    from shear.sparse.export import load_compressed

    text = tmp_path / "calib.txt"
    text.write_text(tiny_text)
    src = weight_bytes(bf16_dir)
    assert checkpoint_dtype(str(bf16_dir)) == "bf16" and header_dtypes(bf16_dir) == {"BF16"}
    calib = ["--n-samples", "4", "--seq-len", "32"]
    assert main(["prune", str(bf16_dir), "--ratio", "0.3", "--estimator", "flap", "--calib", str(text),
                 "-o", str(tmp_path / "p")] + calib) == 0
    assert main(["sparsify", str(bf16_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--source", str(text),
                 "-o", str(tmp_path / "s")] + calib) == 0
    pruned, dense, comp = tmp_path / "p" / "model", tmp_path / "s" / "model", tmp_path / "s" / "compressed"
    for d in (pruned, dense, comp):
        assert header_dtypes(d) == {"BF16"}, d
        assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16", d
    rp, rs = (json.loads((tmp_path / x / "report.json").read_text()) for x in ("p", "s"))
    for r in (rp, rs):
        assert r["dtype"] == {"checkpoint": "bf16", "loaded": "fp32", "written": "bf16"}
        assert r["source_weight_bytes"] == src and r["vm_hwm_mb"] > 0
    # sizes: bf16 bytes (2 per parameter + the header), not the fp32 copy of before (1.4x / 2x the source)
    assert rp["model_bytes"]["weights"] == weight_bytes(pruned)
    assert abs(weight_bytes(pruned) - 2 * rp["params_after"]) < 16_000 and weight_bytes(pruned) < 0.8 * src
    assert rs["export"]["model"]["bytes"]["weights"] == weight_bytes(dense) and abs(weight_bytes(dense) - src) < 1_000
    assert weight_bytes(comp) < weight_bytes(dense)
    # the compressed values decompress to the dense bf16 weights bit for bit
    back, info = load_compressed(comp)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    ref = load_model(str(dense), dtype="bf16").state_dict()
    assert all(v.dtype == ref[k].dtype and torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    # plain from_pretrained in a fresh process: bf16, no missing or unexpected keys, the same logits
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    for d in (pruned, dense):
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            save_file({"ids": ids, "out": m(input_ids=ids).logits}, d / "expected.safetensors")
    run = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), json.dumps(["p/model", "s/model"])], env=ONE_THREAD,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    # --dtype fp32 asks for fp32
    assert main(["prune", str(bf16_dir), "--ratio", "0.3", "--estimator", "magnitude_l2", "--dtype", "fp32",
                 "-o", str(tmp_path / "p32")]) == 0
    assert header_dtypes(tmp_path / "p32" / "model") == {"F32"}
    assert json.loads((tmp_path / "p32" / "model" / "config.json").read_text())["dtype"] == "float32"


def test_fp32_checkpoint_export_is_unchanged(tiny_lm_dir, tmp_path):
    """auto on an fp32 checkpoint: loaded and written in fp32, one file, byte for byte the plain
    ``save_pretrained`` of the pruned model (what export wrote before dtypes and shards existed)."""
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune

    written = export_dtype("auto", str(tiny_lm_dir))
    assert written == "fp32" and load_dtype(written, checkpoint_dtype(str(tiny_lm_dir))) == "fp32"
    model = load_model(str(tiny_lm_dir), dtype=written)
    run_prune(model, load_tokenizer(str(tiny_lm_dir)), PruneConfig(target={"ratio": 0.3}),
              ImportanceConfig(estimator="magnitude_l2"), export_dir=tmp_path / "a", export_dtype=written)
    model.save_pretrained(tmp_path / "b")
    assert sorted(f.name for f in (tmp_path / "a").glob("*.safetensors")) == ["model.safetensors"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("plan", [{"layers.0.mlp_channel": [1, 2]},  # uneven widths: per-layer export
                                  {"layers.0.mlp_channel": [1, 2], "layers.1.mlp_channel": [3, 4]}])  # stock
def test_small_shards_load_to_identical_logits(plan, tmp_path):
    from shear.sparse import SparsifyConfig
    from shear.sparse.export import load_compressed
    from shear.sparse.pipeline import export_sparse, run_sparsify

    model = family_model("llama")
    prune_(model, PrunePlan(plan))
    one = export(model, tmp_path / "one")
    many = export(model, tmp_path / "many", max_shard_size="100KB")
    remote = (one / "modeling_shear_pruned.py").exists()
    assert remote == (len(plan) == 1)
    shards = sorted(f.name for f in many.glob("*.safetensors"))
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (many / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert set(json.loads((many / "shear_export.json").read_text())["files"]) >= {*shards, "model.safetensors.index.json"}
    a, b = (AutoModelForCausalLM.from_pretrained(d, trust_remote_code=remote).eval() for d in (one, many))
    assert torch.equal(outputs(a, IDS), outputs(b, IDS)) and torch.equal(outputs(b, IDS), outputs(model, IDS))
    # the compressed form shards the same way and decompresses to the same weights
    cfg = SparsifyConfig(method="magnitude", sparsity=0.5)
    model, report = run_sparsify(family_model("llama"), None, cfg)
    export_sparse(model, report, cfg, tmp_path / "sd", tmp_path / "sc", max_shard_size="100KB")
    assert len(list((tmp_path / "sc").glob("*.safetensors"))) > 1
    back, info = load_compressed(tmp_path / "sc")
    assert info == {"missing_keys": [], "unexpected_keys": []}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_per_layer_export_in_bf16(tmp_path):
    """export(dtype=...) casts in place: the per-layer modeling file rebuilds bf16 parameters, every key loads."""
    model = family_model("llama")
    prune_(model, PrunePlan({"layers.0.mlp_channel": [1, 2]}))
    out = export(model, tmp_path / "x", dtype="bf16")
    assert header_dtypes(out) == {"BF16"} and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    back, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert back.dtype == torch.bfloat16 and not any(info.values())
    assert torch.equal(outputs(back.eval(), IDS), outputs(model, IDS))


def test_checkpoint_dtype_reads_headers_then_config(tmp_path):
    model = family_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    d = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**d, "dtype": "float32"}))  # the headers are what is on disk
    assert checkpoint_dtype(str(tmp_path / "m")) == "bf16"
    (tmp_path / "m" / "model.safetensors").unlink()
    assert checkpoint_dtype(str(tmp_path / "m")) == "fp32"
    cfg.write_text(json.dumps({k: v for k, v in d.items() if k != "dtype"} | {"torch_dtype": "float16"}))
    assert checkpoint_dtype(str(tmp_path / "m")) == "fp16"
    cfg.write_text(json.dumps({k: v for k, v in d.items() if k != "dtype"}))
    assert checkpoint_dtype(str(tmp_path / "m")) is None
    assert export_dtype("auto", str(tmp_path / "m")) == "fp32" and export_dtype("bf16", str(tmp_path / "m")) == "bf16"
    assert export_dtype("auto", None, family_model("llama").half()) == "fp16"
    with pytest.raises(ValueError, match="expected one of"):
        export_dtype("int8", None)


def test_load_dtype_keeps_half_only_on_gpu_and_when_written_so():
    assert load_dtype("fp32", "fp32") == "fp32"
    assert load_dtype("bf16", "bf16") == "fp32"  # CPU: fp32 compute
    assert load_dtype("bf16", "bf16", "cuda:0") == "bf16"
    assert load_dtype("fp32", "bf16", "cuda") == "fp32"  # written wider than stored: fp32 updates kept
    assert load_dtype("bf16", "fp16", "cuda") == "fp32"


def test_cast_weights_keeps_buffers_and_ties():
    model = family_model("gemma")  # tied LM head
    buffers = {k: v.dtype for k, v in model.named_buffers()}
    cast_weights_(model, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config.dtype == torch.bfloat16
    assert {k: v.dtype for k, v in model.named_buffers()} == buffers
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cast_weights_(model, None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_shard_size_and_recipe_keys():
    from shear.config import ExportConfig

    assert shard_size("5GB") == "5GB" and shard_size("1000") == 1000 and shard_size(2**20) == 2**20
    for bad in ("5 parsecs", "0", "GB"):
        with pytest.raises(ValueError, match="max shard size"):
            shard_size(bad)
    assert ExportConfig(dtype="auto", max_shard_size="2GB").max_shard_size == "2GB"
    with pytest.raises(ValueError, match="max shard size"):
        ExportConfig(max_shard_size="lots")


def test_run_export_auto_writes_the_checkpoint_dtype(bf16_dir, tmp_path):
    from shear.config import validate_recipe
    from shear.pipeline import run_recipe

    recipe = validate_recipe({"model": {"path": str(bf16_dir)}, "output_dir": str(tmp_path / "run"),
                              "export": {"dtype": "auto", "max_shard_size": "100KB"}})
    run_recipe(recipe)
    out = tmp_path / "run" / "model"
    assert header_dtypes(out) == {"BF16"} and (out / "model.safetensors.index.json").exists()


def test_memory_helpers():
    assert isinstance(trim(), bool)
    assert peak_rss_bytes() > 0 if sys.platform.startswith("linux") else peak_rss_bytes() == 0


def test_no_export_refuses_export_flags(tmp_path, capsys):
    from shear.cli import main

    assert main(["prune", str(tmp_path / "no-model"), "--no-export", "--dtype", "bf16"]) == 2
    assert "nothing is written with --no-export" in capsys.readouterr().err
