"""``shear sparsify --stream`` (shear.sparse.stream): one block at a time from the shards.

The streamed export equals the in-memory one bit for bit (Wanda 50%, SparseGPT 2:4, magnitude; Llama,
GPT-2 with its Conv1D and tied head, Qwen2 with biases; bf16 and fp32 checkpoints in several shards), reloads
with plain ``from_pretrained`` in a fresh process with no missing or unexpected keys, and a deep model's
streamed run needs a fraction of the in-memory run's peak memory.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import reload_in_child
from families import family_model, outputs
from shear.shards import ShardWriter
from shear.sparse import SparsifyConfig
from shear.sparse.pipeline import export_sparse, run_sparsify
from shear.sparse.stream import run_sparsify_streamed

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
METHODS = [("wanda", dict(sparsity=0.5)), ("sparsegpt", dict(pattern="2:4")), ("magnitude", dict(sparsity=0.5))]
CASES = [(f, d, m, t) for f in ("llama", "gpt2") for d in ("bf16", "fp32") for m, t in METHODS] + \
        [("qwen2", "bf16", "sparsegpt", dict(sparsity=0.5))]
SHARD = "40KB"  # a tiny model in several shards



def _save(family: str, dtype: str, path, shard=SHARD, **over):
    model = family_model(family, **over)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).save_pretrained(path, max_shard_size=shard)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_streamed_equals_in_memory_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    cases = []
    for k, (fam, dtype, method, target) in enumerate(CASES):
        src = _save(fam, dtype, tmp_path / f"src{k}")
        assert len(list(src.glob("*.safetensors"))) > 1  # several shards in
        cfg = SparsifyConfig(method=method, batch_size=2, compressed=False, **target)
        ids = None if method == "magnitude" else CALIB
        model, report = run_sparsify(_load(src), None, cfg, ids=ids)  # today's path: the whole model in fp32
        export_sparse(model, report, cfg, tmp_path / f"mem{k}", None, dtype=dtype)
        streamed = run_sparsify_streamed(str(src), None, cfg, tmp_path / f"st{k}", written=dtype, ids=ids,
                                         max_shard_size=SHARD)
        out = tmp_path / f"st{k}"
        assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
        want = AutoModelForCausalLM.from_pretrained(tmp_path / f"mem{k}").state_dict()
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert want.keys() == got.keys()
        diff = [n for n in want if want[n].dtype != got[n].dtype or not torch.equal(want[n], got[n])]
        assert not diff, (fam, dtype, method, diff[:3])
        assert streamed["plan"] == report["plan"] and streamed["pruned"] == report["pruned"]
        assert streamed["params"] == report["params"] and streamed["model_sparsity"] == report["model_sparsity"]
        assert streamed["stream"] and streamed["export"]["dtype"] == dtype
        assert 0.45 < streamed["pruned_sparsity"] <= 0.5 + 1e-6  # not vacuous: half of every linear is zero
        # the weights really moved: the pruned model is not the source
        assert not torch.equal(outputs(model, IDS), outputs(_load(src), IDS))
        save_file({"out": outputs(_load(tmp_path / f"mem{k}"), IDS)}, out / "expected.safetensors")
        cases.append(f"st{k}")
    assert reload_in_child(tmp_path, cases, IDS) == []


def test_shard_writer_plans_like_save_pretrained(tmp_path):
    specs = {"a": ([4, 4], torch.float32), "big": ([64, 4], torch.bfloat16), "b": ([3], torch.int64),
             "c": ([2, 8], torch.float16)}
    tensors = {n: torch.arange(torch.Size(s).numel()).reshape(s).to(d) for n, (s, d) in specs.items()}
    w = ShardWriter(tmp_path, specs, 100)  # [a, b], [big] (512 bytes: alone, as huggingface_hub splits), [c]
    with pytest.raises(ValueError, match="out of order"):
        w.write("b", tensors["b"])  # a comes first in their shard
    with pytest.raises(ValueError, match="declared"):
        w.write("a", tensors["a"].double())
    for n, t in tensors.items():
        w.write(n, t)
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    assert index["weight_map"]["big"] not in {index["weight_map"][n] for n in "abc"}
    back = {}
    for f in files[:-1]:
        back.update(load_file(tmp_path / f))
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())


def test_cli_stream_report_and_refusals(tiny_lm_dir, tiny_text, tmp_path, capsys):
    from shear.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(tiny_text)
    base = ["sparsify", str(tiny_lm_dir), "--method", "wanda", "--sparsity", "0.5", "--n-samples", "4",
            "--seq-len", "32", "--source", str(text), "--stream"]
    assert main(base + ["-o", str(tmp_path / "a")]) == 2  # the compressed form was asked for (the default)
    assert "add --no-compressed" in capsys.readouterr().err
    assert main(base + ["--no-compressed", "--allocation", "owl", "-o", str(tmp_path / "a")]) == 2
    assert "OWL" in capsys.readouterr().err
    assert not (tmp_path / "a" / "model").exists()  # refused before any work (OUT holds only the lock)
    assert main(base + ["--no-compressed", "-o", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["stream"] and report["calibration"] == [4, 32] and str(text) in report["calibration_text"]
    assert report["dtype"] == {"checkpoint": "fp32", "loaded": "fp32", "written": "fp32"}
    assert len(report["plan"]) == 2 and report["vm_hwm_mb"] > 0 and report["export"]["model"]["bytes"]["weights"] > 0
    assert (tmp_path / "a" / "model" / "tokenizer.json").is_file()
    assert (tmp_path / "a" / "model" / "shear_recipe.yaml").is_file()
    # the same run in memory writes the same weights
    assert main(base[:-1] + ["--no-compressed", "-o", str(tmp_path / "b")]) == 0
    want, got = (load_file(tmp_path / d / "model" / "model.safetensors") for d in "ba")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert main(base + ["--no-compressed", "-o", str(tmp_path / "a")]) == 2  # taken, no --overwrite
    # over an in-memory run with both forms: the model and report are replaced, the old compressed form goes
    assert main(base[:-1] + ["-o", str(tmp_path / "b"), "--overwrite"]) == 0 and (tmp_path / "b" / "compressed").is_dir()
    assert main(base + ["--no-compressed", "--overwrite", "-o", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "compressed").exists()
    assert json.loads((tmp_path / "b" / "report.json").read_text())["stream"]
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no staging left behind


PEAK = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline
    from safetensors.torch import load_file
    from shear.memory import peak_rss_bytes, trim
    from shear.models import load_model
    from shear.sparse import SparsifyConfig
    from shear.sparse.pipeline import export_sparse, run_sparsify
    from shear.sparse.stream import run_sparsify_streamed
    src, out, mode = sys.argv[1:4]
    ids = load_file(src + "/../ids.safetensors")["ids"]
    cfg = SparsifyConfig(method="wanda", sparsity=0.5, batch_size=4, compressed=False)
    trim()
    base = peak_rss_bytes()
    if mode == "stream":
        run_sparsify_streamed(src, None, cfg, out, written="bf16", ids=ids)
    else:
        model, report = run_sparsify(load_model(src), None, cfg, ids=ids)
        export_sparse(model, report, cfg, out, None, dtype="bf16")
    print(json.dumps({"base": base, "peak": peak_rss_bytes()}))
""")


def test_streamed_peak_memory_is_a_fraction_of_in_memory(tmp_path):
    """24 blocks of hidden 256 (~100 MB in fp32): the in-memory run holds all of them, the streamed one one."""
    src = _save("llama", "bf16", tmp_path / "src", "10MB", hidden_size=256, intermediate_size=1024, num_hidden_layers=24,
                num_attention_heads=8, num_key_value_heads=8, head_dim=32, std=0.02)
    save_file({"ids": torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))},
              tmp_path / "ids.safetensors")
    grew = {}
    for mode in ("stream", "memory"):
        run = subprocess.run([sys.executable, "-c", PEAK, str(src), str(tmp_path / mode), mode], capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        r = json.loads(run.stdout.strip().splitlines()[-1])
        grew[mode] = r["peak"] - r["base"]
    fp32 = 24 * (4 * 256 * 256 + 3 * 256 * 1024) * 4
    assert grew["memory"] > 0.9 * fp32, grew  # the in-memory run holds every block in fp32
    assert grew["stream"] < 0.6 * grew["memory"], grew


def test_checkpoint_names_without_the_base_prefix_and_missing_tensors(tmp_path, caplog):
    """GPT-2 checkpoints saved from GPT2Model name ``h.0...`` (no ``transformer.``): read as from_pretrained
    reads them (an extra tensor is named in a warning and not written); a missing block tensor is refused."""
    src = _save("gpt2", "fp32", tmp_path / "src", shard="10MB")
    state = load_file(src / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    save_file(dict(state, **{"extra.weight": torch.zeros(2)}), src / "model.safetensors", metadata={"format": "pt"})
    cfg = SparsifyConfig(method="wanda", sparsity=0.5, batch_size=2, compressed=False)
    model, report = run_sparsify(_load(src), None, cfg, ids=CALIB)
    export_sparse(model, report, cfg, tmp_path / "mem", None, dtype="fp32")
    caplog.set_level("WARNING", logger="shear")
    run_sparsify_streamed(str(src), None, cfg, tmp_path / "st", written="fp32", ids=CALIB)
    assert "extra.weight" in caplog.text
    want, got = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "st" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    del state["h.1.mlp.c_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="transformer.h.1.mlp.c_proj.weight"):
        run_sparsify_streamed(str(src), None, cfg, tmp_path / "st2", written="fp32", ids=CALIB)
    assert not (tmp_path / "st2").exists() and not list(tmp_path.glob(".st2*"))
