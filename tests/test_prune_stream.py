"""``shear prune --stream`` (shear.prune.stream): score and slice one block at a time, disk to disk.

The streamed run gives the plan, the exported tensors (bias compensation included) and the config of the
in-memory run, bit for bit, across families (GQA Llama, GPT-2's Conv1D and tied head, Qwen2's biases, OLMo 2's
projection-wide q/k norms, Gemma 3's sliding layers, OPT), estimators (OBS's layer-sequential refit included)
and allocations (stock and per-layer exports), from bf16 checkpoints in several shards; the export reloads in a
fresh process with no missing or unexpected keys and the in-memory export's logits; what needs the whole model
is refused before any work; a deep model's streamed run needs a fraction of the in-memory run's peak memory.
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
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune
from shear.prune.stream import prune_streamed

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
SHARD = "40KB"
# (family, estimator, allocation): stock (uniform, balanced) and per-layer (global, pool) exports
CASES = [("llama", "flap", "uniform"), ("llama", "flap", "global"), ("gpt2", "flap", "global"),
         ("qwen2", "wanda_sp", "uniform"), ("olmo2", "flap", "balanced"), ("gemma3_text", "flap", "global"),
         ("qwen3", "flap_original", "pool"), ("opt", "minitron", "global"), ("mistral", "magnitude_l2", "global"),
         ("llama", "random", "uniform"),
         # OBS (the default estimator): refit layer-sequentially; stock with new biases (CLI default allocation),
         # GPT-2's existing biases refitted in place, per-layer with new biases on Qwen2
         ("llama", "obs", "balanced"), ("gpt2", "obs", "uniform"), ("qwen2", "obs", "global")]



def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_streamed_equals_in_memory_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    cases = []
    for k, (fam, est, alloc) in enumerate(CASES):
        src = tmp_path / f"src{k}"
        torch.manual_seed(k)
        family_model(fam).to(torch.bfloat16).save_pretrained(src, max_shard_size=SHARD)
        assert len(list(src.glob("*.safetensors"))) > 1  # several shards in
        cfg = PruneConfig(target={"ratio": 0.3}, structures=["heads", "mlp"], allocation=alloc)
        icfg = ImportanceConfig(estimator=est, batch_size=2)
        rep = prune_streamed(src, None, cfg, icfg, out_dir=tmp_path / f"r{k}", export_dir=tmp_path / f"st{k}",
                             written="bf16", ids=CALIB, max_shard_size=SHARD)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        _, plan, want = run_prune(model, None, cfg, icfg, export_dir=tmp_path / f"mem{k}", ids=CALIB,
                                  export_dtype="bf16", max_shard_size=SHARD)
        st, mem = tmp_path / f"st{k}", tmp_path / f"mem{k}"
        assert json.loads((tmp_path / f"r{k}" / "plans.json").read_text())[0]["remove"] == plan.remove, (fam, est)
        assert sum(map(len, plan.remove.values())) > 0
        a, b = _tensors(st), _tensors(mem)
        assert a.keys() == b.keys(), (fam, set(a) ^ set(b))
        diff = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
        assert not diff, (fam, est, alloc, diff[:3])
        assert json.loads((st / "config.json").read_text()) == json.loads((mem / "config.json").read_text())
        assert sorted(p.name for p in st.iterdir()) == sorted(p.name for p in mem.iterdir())
        assert len(list(st.glob("*.safetensors"))) > 1 and (st / "model.safetensors.index.json").is_file()
        for key in ("params_after", "macs_after", "widths_after", "bias_compensation"):
            assert rep[key] == want[key], (fam, key)
        assert rep["stream"] and rep["removed_ratio"] > 0.2
        reloaded = AutoModelForCausalLM.from_pretrained(mem, dtype=torch.float32, trust_remote_code=True).eval()
        save_file({"out": outputs(reloaded, IDS)}, st / "expected.safetensors")  # the in-memory export's
        cases.append(f"st{k}")
    assert reload_in_child(tmp_path, cases, IDS) == []


def test_cli_stream_and_refusals(tiny_lm_dir, tiny_text, tmp_path, capsys):
    from shear.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(tiny_text)
    base = ["prune", str(tiny_lm_dir), "--ratio", "0.3", "--n-samples", "4", "--seq-len", "32", "--calib", str(text),
            "--stream"]
    assert main(base + ["--estimator", "flap", "--structures", "heads", "mlp", "hidden", "-o", str(tmp_path / "a")]) == 2
    assert "hidden" in capsys.readouterr().err
    assert main(base + ["--estimator", "taylor_element1", "-o", str(tmp_path / "a")]) == 2  # gradients
    assert "estimator 'taylor_element1'" in capsys.readouterr().err
    assert not (tmp_path / "a" / "model").exists()  # refused before any work
    # the default estimator (obs, refitted block by block) streams, and writes what it writes in memory
    assert main(base + ["-o", str(tmp_path / "o")]) == 0 and main(base[:-1] + ["-o", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["estimator"] == "obs"
    want, got = (_tensors(tmp_path / d / "model") for d in "po")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert main(base + ["--estimator", "flap", "-o", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "params" in printed and "peak RSS" in printed
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["stream"] and report["calibration"] == [4, 32] and str(text) in report["calibration_text"]
    assert report["dtype"] == {"checkpoint": "fp32", "loaded": "fp32", "written": "fp32"}
    assert report["vm_hwm_mb"] > 0 and report["model_bytes"]["weights"] > 0
    assert (tmp_path / "a" / "kept_widths.png").is_file() and (tmp_path / "a" / "plans.json").is_file()
    assert (tmp_path / "a" / "model" / "tokenizer.json").is_file()
    assert (tmp_path / "a" / "model" / "shear_recipe.yaml").is_file()
    # the same command without --stream writes the same weights
    assert main(base[:-1] + ["--estimator", "flap", "-o", str(tmp_path / "b")]) == 0
    want, got = (_tensors(tmp_path / d / "model") for d in "ba")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert main(base + ["--estimator", "flap", "-o", str(tmp_path / "a")]) == 2  # taken, no --overwrite
    assert main(base + ["--estimator", "wanda_sp", "--overwrite", "-o", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["estimator"] == "wanda_sp"
    assert main(base + ["--estimator", "flap", "--no-export", "-o", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "report.json").is_file() and not (tmp_path / "c" / "model").exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no staging left behind


PEAK = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline
    from safetensors.torch import load_file
    from shear.memory import peak_rss_bytes, trim
    from shear.models import load_model
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune
    from shear.prune.stream import prune_streamed
    src, out, mode = sys.argv[1:4]
    ids = load_file(src + "/../ids.safetensors")["ids"]
    cfg, icfg = PruneConfig(target={"ratio": 0.3}, allocation="uniform"), ImportanceConfig(estimator="flap", batch_size=4)
    trim()
    base = peak_rss_bytes()
    if mode == "stream":
        prune_streamed(src, None, cfg, icfg, export_dir=out, written="bf16", ids=ids)
    else:
        run_prune(load_model(src), None, cfg, icfg, export_dir=out, ids=ids, export_dtype="bf16")
    print(json.dumps({"base": base, "peak": peak_rss_bytes()}))
""")


def test_streamed_peak_memory_is_a_fraction_of_in_memory(tmp_path):
    """24 blocks of hidden 256 (~100 MB in fp32): the in-memory run holds all of them, the streamed one one."""
    torch.manual_seed(0)
    family_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=8,
                 num_key_value_heads=8, head_dim=32, std=0.02).to(torch.bfloat16).save_pretrained(
        tmp_path / "src", max_shard_size="10MB")
    save_file({"ids": torch.randint(0, 100, (8, 64), generator=torch.Generator().manual_seed(0))},
              tmp_path / "ids.safetensors")
    grew = {}
    for mode in ("stream", "memory"):
        run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "src"), str(tmp_path / mode), mode],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        r = json.loads(run.stdout.strip().splitlines()[-1])
        grew[mode] = r["peak"] - r["base"]
    fp32 = 24 * (4 * 256 * 256 + 3 * 256 * 1024) * 4
    assert grew["memory"] > 0.9 * fp32, grew  # the in-memory run holds every block in fp32
    assert grew["stream"] < 0.5 * grew["memory"], grew
    a, b = _tensors(tmp_path / "stream"), _tensors(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_reads_equal_safetensors_and_cast_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """Tensors read by plain file reads (not memory-mapped) equal safetensors' own load, as stored or cast (a
    few rows at a time: the buffer boundary falls inside the tensors here); a truncated shard is named."""
    import shear.checkpoint as sc
    from safetensors.torch import load_file

    stored = {"a": torch.randn(1000, 77).bfloat16(), "b": torch.randn(5).half(), "c": torch.arange(6),
              "s": torch.tensor(3.5).bfloat16(), "m": torch.rand(3, 4) > 0.5, "e": torch.zeros(0, 3)}
    save_file(stored, tmp_path / "model.safetensors")
    want = load_file(tmp_path / "model.safetensors")
    monkeypatch.setattr(sc, "READ_CHUNK", 1000)  # 6 rows of "a" per step
    ckpt = sc.Checkpoint(tmp_path)
    got = ckpt.read(list(stored))
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in stored)
    cast = ckpt.read(list(stored), dict.fromkeys(stored, torch.float32))
    assert all(torch.equal(cast[k], want[k].float()) and cast[k].dtype == torch.float32 for k in "abse")
    assert cast["c"].dtype == torch.int64 and cast["m"].dtype == torch.bool  # non-floating: as stored
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match="truncated"):
        sc.Checkpoint(tmp_path).read(list(stored))


def test_a_checkpoint_too_big_for_memory_is_named_with_the_streamed_flags(tiny_lm_dir, monkeypatch, caplog):
    import shear.memory
    from shear.models import warn_if_too_big

    caplog.set_level("WARNING", logger="shear")
    warn_if_too_big(str(tiny_lm_dir), "prune", "--stream")
    assert not caplog.text  # a tiny checkpoint fits
    monkeypatch.setattr(shear.memory, "available_bytes", lambda: 1000)
    warn_if_too_big(str(tiny_lm_dir), "prune", "--stream --estimator flap")
    assert "prune:" in caplog.text and "--stream --estimator flap holds one block at a time" in caplog.text
